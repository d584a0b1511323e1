"""The acm_d2 Trainer: Detectron2's DefaultTrainer with COCO evaluation and multi-process CPU training."""
import logging
import os
import weakref

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["Trainer", "create_ddp_model_any_device"]


def create_ddp_model_any_device(model, **kwargs):
    """Detectron2's create_ddp_model (DDP when there are several processes, else the model itself), with
    `device_ids` only for a GPU model: PyTorch refuses them for a model on the CPU (gloo)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return create_ddp_model(model, device_ids=None if on_cpu else [comm.get_local_rank()], **kwargs)


class Trainer(DefaultTrainer):
    """DefaultTrainer whose evaluator is COCOEvaluator (bbox, and segm with masks) and whose DDP wrapper
    also works for CPU models: PyTorch refuses `device_ids` for a module on the CPU (gloo)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with one change, the device_ids given to create_ddp_model.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model_any_device(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)
