#!/usr/bin/env python
"""Train or evaluate a model from a Python (LazyConfig) config file, e.g. configs/lazy/*.py.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_acm_R_50_FPN_1x.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth
    python tools/lazyconfig_train_net.py --config-file ... --coco-dataset my_train train.json images/ \
        dataloader.train.dataset.names=my_train

The config holds model, dataloader.{train,test,evaluator}, optimizer, lr_multiplier and train (see
Detectron2's model_zoo configs/common/train.py); overrides are `key=value`. As tools/train_net.py, through
the same pieces: acm_d2's set-up (CPU fallback, --coco-dataset, a locked output folder), a DDP wrapper
that also works for CPU models, checkpoints read without running code from them, checked and written
atomically, the stop on a non-finite loss naming the terms, and the per-step random seeding and metric
history of exact resume (ExactResumeHook). What it lacks against tools/train_net.py: the data stream
restarts at a resume (the config's own dataloader, not acm_d2's resumable one, so the images after a
resume differ from an uninterrupted run's), and a run killed while writing model_final.pth is not
completed by --resume.
"""

import logging

from detectron2.config import instantiate
from detectron2.engine import default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import acm_d2  # noqa: F401  (registers the backbones and meta-architectures, also in spawned workers)
from acm_d2.checkpoint.checkpointer import AtomicCheckpointer
from acm_d2.engine import (
    ExactResumeHook,
    PreemptionCheckpointer,
    argument_parser,
    build_step_trainer,
    create_ddp_model_any_device,
    launch_from_args,
    load_weights_for_evaluation,
    register_datasets,
    setup_lazy,
)

logger = logging.getLogger("acm_d2")


def evaluate(cfg, model):
    """COCO AP of `model` on dataloader.test with dataloader.evaluator (printed, and returned)."""
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def train(cfg, resume: bool):
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model_any_device(model, **cfg.train.ddp)
    trainer = build_step_trainer(
        model, instantiate(cfg.dataloader.train), optimizer, amp=cfg.train.amp.enabled
    )
    seed = cfg.train.get(
        "seed", -1
    )  # Detectron2's common/train.py has none: then one drawn for all ranks
    resume_hook = ExactResumeHook(seed if seed >= 0 else comm.shared_random_seed())
    # The trainer's state (saved with the checkpoint) holds its hooks' state, ExactResumeHook's seed and history.
    checkpointer = AtomicCheckpointer(
        model, cfg.train.output_dir, optimizer=optimizer, trainer=trainer
    )
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            resume_hook,
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if main_process
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main_process
            else None,
            PreemptionCheckpointer(checkpointer),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # A checkpoint stores the iteration that finished: resume at the next one.
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    register_datasets(args)
    cfg = setup_lazy(args)
    if not args.eval_only:
        return train(cfg, args.resume)
    model = create_ddp_model_any_device(instantiate(cfg.model).to(cfg.train.device))
    load_weights_for_evaluation(
        model, cfg.train.init_checkpoint, cfg.train.output_dir, args, "train.init_checkpoint"
    )
    return evaluate(cfg, model)


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_from_args(main, args)


if __name__ == "__main__":
    invoke_main()
