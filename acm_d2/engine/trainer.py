"""The acm_d2 Trainer: Detectron2's DefaultTrainer with COCO evaluation, multi-process CPU training,
atomic checkpoints, exact resume, and a clear stop on a non-finite loss."""

import logging
import math
import os
import weakref

import torch
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    create_ddp_model,
    hooks,
)
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import AtomicCheckpointer
from ..compat import call_overridden, set_inner_trainer, trainer_hooks
from ..config import amp_precision
from ..data.mapper import DatasetMapper, instance_mask_format
from ..data.stream import ResumableTrainStream, build_resumable_train_loader
from ..modeling.checks import check_context_keys, check_num_classes
from .output_lock import lock_output_dir_on_main_process
from .preemption import PreemptionCheckpointer
from .resume import ExactResumeHook

__all__ = [
    "Trainer",
    "NonFiniteLossError",
    "RanksInSyncCheck",
    "build_step_trainer",
    "create_ddp_model_any_device",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became inf or NaN (or training diverged otherwise, e.g. Detectron2's RPN found inf/NaN
    boxes); the message names the term(s), the iteration, the last checkpoint and the knobs to turn."""


DIVERGENCE_KNOBS = "Lower SOLVER.BASE_LR or raise SOLVER.WARMUP_ITERS."


class _StopOnNonFiniteLoss:
    """Checks this rank's loss terms before Detectron2 writes them (and before the optimizer steps), and
    raises NonFiniteLossError naming the non-finite ones. Detectron2 would raise a FloatingPointError on
    the main rank only, for the rank-averaged sum. One host sync per step, as Detectron2's .item() calls."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        values = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
        if not bool(torch.isfinite(values).all()):
            terms = {k: float(v) for k, v in zip(loss_dict, values.cpu())}
            bad = ", ".join(f"{k} = {v}" for k, v in terms.items() if not math.isfinite(v))
            good = ", ".join(f"{k} = {v:.4g}" for k, v in terms.items() if math.isfinite(v))
            hint = " (lower MODEL.ACM.ORTH_LOSS_WEIGHT)" if "loss_acm_orth" in bad else ""
            raise NonFiniteLossError(
                f"Loss became infinite or NaN at iteration {self.iter if iter is None else iter}"
                f"{f' on rank {comm.get_rank()}' if comm.get_world_size() > 1 else ''}: {bad}{hint}; "
                f"finite terms: {good or 'none'}. {DIVERGENCE_KNOBS}"
            )
        call_overridden(
            _StopOnNonFiniteLoss,
            self,
            "_write_metrics",
            loss_dict,
            data_time,
            prefix=prefix,
            iter=iter,
        )


class _SimpleTrainer(_StopOnNonFiniteLoss, SimpleTrainer):
    pass


class _AMPTrainer(_StopOnNonFiniteLoss, AMPTrainer):
    pass


def build_step_trainer(model, data_loader, optimizer, amp: bool = False, precision=torch.float16):
    """Detectron2's SimpleTrainer, or AMPTrainer with `precision`, that stops with NonFiniteLossError
    naming the loss terms when one becomes inf/NaN (shared by Trainer and tools/lazyconfig_train_net.py)."""
    if amp:
        return _AMPTrainer(model, data_loader, optimizer, precision=precision)
    return _SimpleTrainer(model, data_loader, optimizer)


class RanksInSyncCheck(HookBase):
    """After a completed multi-process run, checks that every rank holds the same weights (DDP keeps them
    identical unless a rank skipped a step or a parameter missed the all-reduce); logs the result."""

    def after_train(self):
        if comm.get_world_size() == 1 or self.trainer.iter < self.trainer.max_iter:
            return
        model = (
            self.trainer.model.module
            if hasattr(self.trainer.model, "module")
            else self.trainer.model
        )
        with torch.no_grad():
            mine = [float(p.double().sum()) for p in model.parameters()]
        everyone = comm.all_gather(mine)
        differing = [i for i, p in enumerate(mine) if any(other[i] != p for other in everyone)]
        if differing:
            names = [n for n, _ in model.named_parameters()]
            logger.error(
                f"Ranks hold different weights after training in {len(differing)} tensors, e.g. {names[differing[0]]}"
            )
        else:
            logger.info(
                f"Ranks hold identical weights after training ({comm.get_world_size()} processes compared)"
            )


def create_ddp_model_any_device(model, **kwargs):
    """Detectron2's create_ddp_model (DDP when there are several processes, else the model itself), with
    `device_ids` only for a GPU model: PyTorch refuses them for a model on the CPU (gloo). The GPU is the
    model's own, not the local rank's: under srun a task may see only the one GPU bound to it."""
    device = next(model.parameters()).device
    return create_ddp_model(
        model, device_ids=None if device.type == "cpu" else [device.index], **kwargs
    )


class Trainer(DefaultTrainer):
    """DefaultTrainer with:

    * COCOEvaluator (bbox, and segm with masks) as the evaluator;
    * a DDP wrapper that also works for CPU models (PyTorch refuses `device_ids` for a CPU module);
    * AtomicCheckpointer: a killed run never leaves a truncated checkpoint or a `last_checkpoint` naming one;
    * exact resume (acm_d2.engine.resume): data order, augmentation and random draws continue as in an
      uninterrupted run with the same cfg.SEED; the optimizer, LR scheduler and AMP grad scaler are
      restored by Detectron2 itself;
    * NonFiniteLossError naming the loss term(s) when a loss becomes inf/NaN, or when Detectron2 reports
      divergence otherwise (the RPN's "Predicted boxes or scores contain Inf/NaN"); no checkpoint is
      written and no evaluation runs after such a step, so `last_checkpoint` names the last good weights;
    * OUTPUT_DIR locked for this run (acm_d2.engine.output_lock), so that only this run cleans up
      temporary files there;
    * a resumed run that had finished all its iterations but was killed while writing model_final.pth
      writes it;
    * SIGUSR1 / SIGTERM stop it at the next iteration boundary with a checkpoint and exit status 75, to
      be requeued (acm_d2.engine.preemption).
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with the changes above.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        lock_output_dir_on_main_process(cfg.OUTPUT_DIR)  # a no-op when setup() took it already
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model_any_device(model, broadcast_buffers=False)
        amp = cfg.SOLVER.AMP.ENABLED
        set_inner_trainer(
            self,
            build_step_trainer(
                model, data_loader, optimizer, amp, amp_precision(cfg) if amp else None
            ),
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        stream = getattr(data_loader, "dataset", None)
        if isinstance(stream, ResumableTrainStream):
            seed = stream.seed
        else:
            stream, seed = None, cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        self._resume_hook = ExactResumeHook(seed, stream)
        self._stopped_on_nonfinite_loss = False
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's build_model after check_context_keys: the ACM backbones and meta-architectures run
        it themselves, this also catches context keys on a plain backbone under a plain meta-architecture."""
        check_context_keys(cfg)
        return super().build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        """A loader whose batch i depends only on (cfg.SEED, i, rank): see acm_d2.engine.resume. Before
        any step: the heads' class counts are checked against the datasets' categories, Mask R-CNN
        against data without masks, and RLE masks switch the mapper to bitmasks (see
        acm_d2.data.mapper.instance_mask_format)."""
        names = cfg.DATASETS.TRAIN
        dataset = get_detection_dataset_dicts(  # as Detectron2's training loader reads the datasets
            names,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON
            else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_num_classes(cfg, names)
        mapper = DatasetMapper(
            cfg, True, instance_mask_format=instance_mask_format(cfg, dataset, names)
        )
        return build_resumable_train_loader(cfg, mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with acm_d2's mapper (16-bit images scaled, unreadable files named)."""
        return build_detection_test_loader(cfg, dataset_name, mapper=DatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        return [
            self._resume_hook,
            *super().build_hooks(),
            RanksInSyncCheck(),
            PreemptionCheckpointer(),
        ]

    def resume_or_load(self, resume=True):
        if resume and comm.is_main_process():
            # Safe: this process holds OUTPUT_DIR's lock (taken in __init__), so no other run is saving there.
            self.checkpointer.remove_stale_temporaries()
        super().resume_or_load(resume=resume)
        if resume and self.start_iter >= self.max_iter:
            self._write_missing_final_checkpoint()

    def _write_missing_final_checkpoint(self):
        """When MAX_ITER is a multiple of CHECKPOINT_PERIOD, the last iteration saves model_{MAX_ITER-1}
        and then model_final; a kill during the second save leaves a run that looks finished without
        model_final.pth. The state just loaded is the one model_final would have held: save it now."""
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if not comm.is_main_process() or "://" in final or os.path.isfile(final):
            return
        logger.warning(
            f"The run in {self.cfg.OUTPUT_DIR} finished all {self.max_iter} iterations but has no model_final.pth "
            f"(it was stopped while writing it): writing it from {self.checkpointer.get_checkpoint_file()}"
        )
        self.checkpointer.save("model_final", iteration=self.iter)

    def run_step(self):
        try:
            super().run_step()
        except (
            FloatingPointError
        ) as error:  # NonFiniteLossError, or Detectron2's own divergence checks
            self._stopped_on_nonfinite_loss = True
            if not isinstance(error, NonFiniteLossError):
                error = f"Training diverged at iteration {self.iter}: {error} {DIVERGENCE_KNOBS}"
            last = (
                self.checkpointer.get_checkpoint_file()
                if self.checkpointer.has_checkpoint()
                else ""
            )
            raise NonFiniteLossError(
                f"{error} Training stopped without saving; the last good checkpoint is "
                f"{last or 'none (none was saved)'}."
            ) from None

    def after_train(self):
        if not self._stopped_on_nonfinite_loss:
            return super().after_train()
        # A non-finite step: skip the hooks that would save (model_final) or evaluate the model.
        self.storage.iter = self.iter
        for h in trainer_hooks(self):
            if not isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook, RanksInSyncCheck)):
                h.after_train()
