"""Section amp_training: the demo config trained with the project's Trainer in fp32 and AMP fp16/bf16."""

import os
import time

import torch

from .common import Context, log

AMP_PRECISIONS = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}
_DATASET_PREFIX = "acm_selftest"


def section_amp_training(ctx: Context) -> dict:
    """The demo config trained with the project's Trainer; NonFiniteLossError is the finding, not an error."""
    from detectron2.data import DatasetCatalog

    from ..benchmark.model import CONFIG_ROOT
    from ..config import load_config
    from ..data.synthetic import generate_dataset, register_synthetic_dataset
    from ..engine import NonFiniteLossError, Trainer

    iterations = 100 if ctx.cuda else 3
    num_images = 64 if ctx.cuda else 8
    data_dir = os.path.join(ctx.workdir, "synthetic")
    if f"{_DATASET_PREFIX}_train" not in DatasetCatalog.list():
        register_synthetic_dataset(
            _DATASET_PREFIX, generate_dataset(data_dir, num_images, 1, image_size=128, seed=0)
        )
    # AMPTrainer asserts CUDA: on the CPU only float32 runs.
    precisions = list(AMP_PRECISIONS) if ctx.cuda else ["fp32"]
    runs = {}
    for module in ("ACM", "none"):
        for precision in precisions:
            cfg = load_config(
                os.path.join(CONFIG_ROOT, "Demo", "mask_rcnn_acm_R_18_FPN_synthetic.yaml"),
                [
                    "MODEL.DEVICE",
                    str(ctx.device),
                    "MODEL.CONTEXT_MODULE",
                    module,
                    "SOLVER.MAX_ITER",
                    iterations,
                    "SOLVER.AMP.ENABLED",
                    AMP_PRECISIONS[precision] is not None,
                    "SOLVER.AMP.PRECISION",
                    AMP_PRECISIONS[precision] or "float16",
                    "DATASETS.TRAIN",
                    (f"{_DATASET_PREFIX}_train",),
                    "DATASETS.TEST",
                    (),
                    "DATALOADER.NUM_WORKERS",
                    1 if ctx.cuda else 0,
                    "OUTPUT_DIR",
                    os.path.join(ctx.workdir, "amp_training"),
                ],
            )
            cfg.freeze()
            label = f"{module} {precision}"
            log(f"amp_training {label}: {iterations} iterations")
            start = time.perf_counter()
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=False)
            result = {
                "module": module,
                "precision": precision,
                "iterations": iterations,
                "finite": True,
                "stopped_at": None,
                "error": None,
            }
            try:
                trainer.train()
            except NonFiniteLossError as error:
                result.update(finite=False, stopped_at=trainer.iter, error=str(error))
            result["final_losses"] = {
                k: v for k, (v, _) in trainer.storage.latest().items() if "loss" in k
            }
            result["seconds"] = time.perf_counter() - start
            runs[label] = result
            log(
                f"amp_training {label}: {'finite' if result['finite'] else 'NON-FINITE at iteration ' + str(result['stopped_at'])}, "
                f"total_loss {result['final_losses'].get('total_loss', float('nan')):.4g}, {result['seconds']:.1f} s"
            )
            del trainer
            if ctx.cuda:
                torch.cuda.empty_cache()
    skipped = (
        []
        if ctx.cuda
        else [f"{m} {p}" for m in ("ACM", "none") for p in AMP_PRECISIONS if p != "fp32"]
    )
    return {"runs": runs, "skipped_without_cuda": skipped, "images": num_images}
