#!/usr/bin/env python
"""`make demo` / `make demo-compare`: train a small ACM Mask R-CNN on the generated comparison dataset
(acm_d2/data/synthetic.py), evaluate it with COCOEvaluator and draw its loss curve and attention maps.

    python tools/demo.py --output output/demo                      # ACM (time: docs/demo.md)
    python tools/demo.py --output output/demo-compare --compare    # the same without and with ACM
    python tools/demo.py --output /tmp/d --num-train 8 SOLVER.MAX_ITER 10   # trailing KEY VALUE: config overrides

A run writes to --output: data/ (the dataset, unless --data), model_final.pth, metrics.json, config.yaml,
log.txt, results.json, loss_curve.png, attention.png (ACM runs), and ends with the line
`demo: bbox AP=<x> segm AP=<y>`. --compare runs `none` and `ACM` each in its own process (own logs,
own output folder <output>/<module>) on the same data, schedule and seed, and prints both.
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time

import cv2
import torch

from acm_d2.compat import last_eval_results
from acm_d2.data.synthetic import generate_dataset, register_synthetic_dataset
from acm_d2.engine import Trainer, setup
from acm_d2.utils.device import resolve_device
from acm_d2.visualization import attention as vis
from acm_d2.visualization.curves import plot_loss_curve

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "Demo",
    "mask_rcnn_acm_R_18_FPN_synthetic.yaml",
)

logger = logging.getLogger("acm_d2.demo")
DATASET_PREFIX = "acm_synthetic"  # the config's DATASETS name <prefix>_train and <prefix>_val


def demo_argument_parser(default_config: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file",
        default=default_config,
        help="the demo config (DATASETS must name acm_synthetic_*)",
    )
    p.add_argument("--output", default="output/demo", help="output folder")
    p.add_argument(
        "--compare", action="store_true", help="train without and with ACM, print both APs"
    )
    p.add_argument(
        "--context-module",
        default="ACM",
        help="MODEL.CONTEXT_MODULE for a single run (ACM, none, SE, ...)",
    )
    p.add_argument(
        "--data",
        default="",
        help="dataset folder (default <output>/data); regenerated, deterministic",
    )
    p.add_argument("--num-train", type=int, default=600, help="generated training images")
    p.add_argument("--num-val", type=int, default=100, help="generated validation images")
    p.add_argument("--image-size", type=int, default=128, help="generated image side, px (>= 48)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generator")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when available",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (CPU runs; default 1: on 2 shared cores a second intra-op thread was slower)",
    )
    p.add_argument("--vis-images", type=int, default=4, help="validation images in attention.png")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs"
    )
    return p


def _results_ap(results: dict, task: str, metric: str = "AP") -> float:
    return float(results.get(task, {}).get(metric, float("nan")))


def run_demo(args) -> dict:
    """One training + evaluation + figures; returns the evaluator's results (plus timings)."""
    start = time.perf_counter()
    output = os.path.abspath(args.output)
    data_dir = args.data or os.path.join(output, "data")
    splits = generate_dataset(
        data_dir, args.num_train, args.num_val, args.image_size, args.data_seed
    )
    register_synthetic_dataset(DATASET_PREFIX, splits)
    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    opts = [
        "OUTPUT_DIR",
        output,
        "MODEL.DEVICE",
        device,
        "MODEL.CONTEXT_MODULE",
        args.context_module,
        *args.opts,
    ]
    cfg = setup(argparse.Namespace(config_file=args.config_file, opts=opts, eval_only=False))
    data_s = time.perf_counter() - start

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # Detectron2's hooks: progress/ETA, metrics.json, checkpoint, evaluation at the end
    results = last_eval_results(trainer)
    train_eval_s = time.perf_counter() - start - data_s

    plot_loss_curve(os.path.join(output, "metrics.json"), os.path.join(output, "loss_curve.png"))
    model = trainer.model
    try:
        vis.acm_modules(model)
    except ValueError:
        logger.info(
            "no ACM in this model (MODEL.CONTEXT_MODULE %s): no attention.png", args.context_module
        )
    else:
        save_val_attention(
            model, cfg, splits["val"], os.path.join(output, "attention.png"), args.vis_images
        )
    results.update(
        context_module=args.context_module,
        device=device,
        data_seconds=round(data_s, 1),
        train_eval_seconds=round(train_eval_s, 1),
        total_seconds=round(time.perf_counter() - start, 1),
    )
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"demo: bbox AP={_results_ap(results, 'bbox'):.2f} segm AP={_results_ap(results, 'segm'):.2f}",
        flush=True,
    )
    return results


def save_val_attention(
    model, cfg, val_split, output_png: str, num_images: int, module: str = ""
) -> None:
    """The paper's Fig. 4 for the first `num_images` validation images: one module (default: the last of
    res4) and the one group whose K or Q maps overlap the ground-truth masks most on these images."""
    from pycocotools.coco import COCO

    json_file, image_root = val_split
    coco = COCO(json_file)
    name = vis.resolve_modules(model, [module] if module else None)[0]
    rows = []
    for image_id in sorted(coco.getImgIds())[:num_images]:
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(os.path.join(image_root, info["file_name"]))
        mask = vis.ground_truth_mask(coco, image_id)
        maps = vis.capture_attention(
            model, image, [name], cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        )[name]
        rows.append({"image": image, "maps": maps, "mask": mask, "label": info["file_name"]})
    group = vis.select_groups([r["maps"] for r in rows], [r["mask"] for r in rows], top=1)[0]
    for row in rows:
        row["group"] = group
    title = f"ACM {vis.short_name(name)}, group {group} (its K or Q overlaps the ground truth most)\nwhite: ground-truth contours"
    vis.render_attention(output_png, rows, title=title)


def run_compare(args) -> dict:
    """`none` then `ACM`, each as this script in its own process and folder, same data."""
    output = os.path.abspath(args.output)
    data_dir = args.data or os.path.join(output, "data")
    shared = [
        "--config-file",
        args.config_file,
        "--data",
        data_dir,
        "--num-train",
        str(args.num_train),
        "--num-val",
        str(args.num_val),
        "--image-size",
        str(args.image_size),
        "--data-seed",
        str(args.data_seed),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--vis-images",
        str(args.vis_images),
    ]
    results = {}
    for module in ("none", "ACM"):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            *shared,
            "--output",
            os.path.join(output, module),
        ]
        cmd += ["--context-module", module, *args.opts]
        subprocess.run(cmd, check=True)
        with open(os.path.join(output, module, "results.json")) as f:
            results[module] = json.load(f)
    print(format_comparison(results), flush=True)
    return results


def format_comparison(results: dict) -> str:
    """A table (one row per context module) and one summary line."""
    cols = [
        ("bbox", "AP"),
        ("bbox", "AP50"),
        ("bbox", "AP75"),
        ("segm", "AP"),
        ("segm", "AP50"),
        ("segm", "AP75"),
    ]
    head = "| context module | " + " | ".join(f"{t} {m}" for t, m in cols) + " | train+eval s |"
    lines = [
        "demo-compare (same data, config, schedule and seed):",
        head,
        "|" + "---|" * (len(cols) + 2),
    ]
    for module, r in results.items():
        values = " | ".join(f"{_results_ap(r, t, m):.2f}" for t, m in cols)
        lines.append(f"| {module} | {values} | {r.get('train_eval_seconds', math.nan):.0f} |")
    lines.append(
        "demo-compare: "
        + "  ".join(
            f"{m}: bbox AP={_results_ap(r, 'bbox'):.2f} segm AP={_results_ap(r, 'segm'):.2f}"
            for m, r in results.items()
        )
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = demo_argument_parser(DEFAULT_CONFIG).parse_args(argv)
    if not args.config_file or not os.path.isfile(args.config_file):
        sys.exit(f"demo: config file {args.config_file!r} does not exist (--config-file)")
    if len(args.opts) % 2:
        sys.exit(f"demo: config overrides must be KEY VALUE pairs, got {args.opts}")
    return run_compare(args) if args.compare else run_demo(args)


if __name__ == "__main__":
    main()
