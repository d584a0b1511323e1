#!/usr/bin/env python
"""Soak test: train an ACM Mask R-CNN for a few hundred iterations on the generated dataset, watch the
process's resident memory, and end with a COCO evaluation.

    python tools/soak.py                         # 300 iterations, R-18 GN at 96 px on the CPU
    python tools/soak.py --iters 1000 --device cuda --json soak.json

Criterion (a leak check, not a benchmark): the resident set size (RSS, from /proc/self/statm) is
sampled every --sample-every iterations, after gc.collect() and malloc_trim(0). Samples in the first --warmup iterations are ignored (caches,
allocator pools and the first evaluation-free steps settle there). The run passes when the median of
the last quarter of the remaining samples exceeds the median of their first quarter by at most
--max-growth-mib (default 64 MiB) - a leak of a few KiB per iteration (e.g. kept graphs, appended
tensors, growing histories) over a few hundred iterations shows up as a steady climb well above that,
while allocator noise does not. Only this process is measured (use --num-workers 0, the default, so
that data loading runs in it too). Exit status 1 when the criterion fails or evaluation gives no AP.
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile

import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import acm_d2  # noqa: F401  (registers the backbones and meta-architectures)
from acm_d2.compat import last_eval_results
from acm_d2.config import load_config
from acm_d2.data.synthetic import generate_dataset, register_synthetic_dataset
from acm_d2.engine import Trainer

CONFIG = os.path.join(
    os.path.dirname(__file__),
    "..",
    "configs",
    "COCO-InstanceSegmentation",
    "mask_rcnn_acm_R_50_FPN_1x.yaml",
)
# From random weights the frozen-BN trunk diverges; GroupNorm R-18 at 96 px trains on a CPU.
SMALL = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.RESNETS.NORM",
    "GN",
    "MODEL.FPN.NORM",
    "GN",
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    64,
    "MODEL.FPN.OUT_CHANNELS",
    64,
    "MODEL.ROI_HEADS.NUM_CLASSES",
    2,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    100,
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    100,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    64,
    "INPUT.MIN_SIZE_TRAIN",
    (96,),
    "INPUT.MAX_SIZE_TRAIN",
    96,
    "INPUT.MIN_SIZE_TEST",
    96,
    "INPUT.MAX_SIZE_TEST",
    96,
    "SOLVER.IMS_PER_BATCH",
    2,
    "SOLVER.BASE_LR",
    0.005,
    "SOLVER.STEPS",
    (),
    "SOLVER.WARMUP_ITERS",
    20,
    "TEST.EVAL_PERIOD",
    0,
    "SEED",
    0,
]


def rss_mib() -> float:
    """This process's resident set size in MiB (Linux /proc; psutil elsewhere), measured after a garbage
    collection and glibc's malloc_trim, so that memory the allocator merely keeps cached (which comes and
    goes with the varying tensor sizes of detection) does not read as growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


class MemoryWatch(HookBase):
    """Samples RSS after every `every`-th step into `samples` as (iteration, MiB)."""

    def __init__(self, every: int):
        self.every, self.samples = every, []

    def after_step(self):
        if (self.trainer.iter + 1) % self.every == 0:
            self.samples.append((self.trainer.iter, rss_mib()))


def growth(samples, warmup: int):
    """(median RSS of the first quarter, of the last quarter) of the samples after `warmup`, in MiB."""
    kept = [m for it, m in samples if it >= warmup]
    if len(kept) < 8:
        raise ValueError(
            f"only {len(kept)} memory samples after warm-up; run more iterations or sample more often"
        )
    q = len(kept) // 4
    return statistics.median(kept[:q]), statistics.median(kept[-q:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="training iterations (default 300)")
    parser.add_argument(
        "--warmup", type=int, default=60, help="iterations ignored by the memory check"
    )
    parser.add_argument(
        "--sample-every", type=int, default=5, help="iterations between RSS samples"
    )
    parser.add_argument(
        "--max-growth-mib", type=float, default=64.0, help="allowed RSS growth after warm-up"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="data-loader workers (not measured)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="dataset, checkpoints, metrics (default: a temp folder)"
    )
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)

    output = args.output_dir or tempfile.mkdtemp(prefix="acm_d2_soak_")
    setup_logger(output)
    setup_logger(output, name="acm_d2")
    splits = generate_dataset(
        os.path.join(output, "data"), num_train=64, num_val=16, image_size=96, seed=0
    )
    train_name, val_name = register_synthetic_dataset("soak", splits)
    cfg = load_config(
        CONFIG,
        SMALL
        + [
            "MODEL.DEVICE",
            args.device,
            "SOLVER.MAX_ITER",
            args.iters,
            "SOLVER.CHECKPOINT_PERIOD",
            max(args.iters // 3, 1),
            "DATALOADER.NUM_WORKERS",
            args.num_workers,
            "DATASETS.TRAIN",
            (train_name,),
            "DATASETS.TEST",
            (val_name,),
            "OUTPUT_DIR",
            output,
        ],
    )
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    watch = MemoryWatch(args.sample_every)
    trainer.register_hooks([watch])
    trainer.resume_or_load(resume=False)
    trainer.train()  # ends with the COCO evaluation of DATASETS.TEST
    results = last_eval_results(trainer)  # the final evaluation

    first, last = growth(watch.samples, args.warmup)
    results = (
        results.get(val_name, results) if results else {}
    )  # one test set: Detectron2 unwraps it
    ap = {task: results[task]["AP"] for task in ("bbox", "segm") if task in results}
    ok_memory = last - first <= args.max_growth_mib
    ok_eval = bool(ap) and all(v == v for v in ap.values())  # AP present and not NaN
    print(
        "\n| iterations | RSS after warm-up (MiB) | RSS at the end (MiB) | growth (MiB) | allowed | bbox AP | segm AP |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.iters} | {first:.1f} | {last:.1f} | {last - first:+.1f} | {args.max_growth_mib:g} | "
        f"{ap.get('bbox', float('nan')):.2f} | {ap.get('segm', float('nan')):.2f} |"
    )
    print("PASS" if ok_memory and ok_eval else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "iters": args.iters,
                    "rss_samples_mib": watch.samples,
                    "rss_first_mib": first,
                    "rss_last_mib": last,
                    "max_growth_mib": args.max_growth_mib,
                    "ap": ap,
                    "passed": ok_memory and ok_eval,
                    "torch": torch.__version__,
                },
                f,
                indent=1,
            )
    return 0 if ok_memory and ok_eval else 1


if __name__ == "__main__":
    sys.exit(main())
