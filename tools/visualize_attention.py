#!/usr/bin/env python
"""Save the K and Q attention maps of a trained ACM model's modules for some images (the paper's Fig. 4).

    python tools/visualize_attention.py --config-file configs/Demo/mask_rcnn_acm_R_18_FPN_synthetic.yaml \
        --weights output/demo/model_final.pth --input a.png b.png --output vis/ \
        [--module res4.1 ...] [--group 3 ...] [--annotations val.json [--top 2]] [KEY VALUE ...]

For each image, <output>/<image name>_attention.png has a row per (module, group) with the image and its
K and Q maps overlaid. Groups: --group, else with --annotations (a COCO JSON holding the images, matched by
file name) the --top groups whose K or Q map overlaps the ground-truth masks most (as the paper chooses),
else every group. Module: --module (a full name or a suffix such as res4.1), else the last ACM of res4.
"""

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument(
        "--weights", required=True, help="a checkpoint of that config (e.g. model_final.pth)"
    )
    p.add_argument("--input", nargs="+", required=True, help="image files")
    p.add_argument("--output", required=True, help="folder for the PNGs")
    p.add_argument(
        "--module",
        nargs="+",
        default=None,
        help="ACM module names or suffixes (default: last of res4)",
    )
    p.add_argument("--group", nargs="+", type=int, default=None, help="group indices to show")
    p.add_argument(
        "--annotations", default=None, help="COCO JSON with the images: pick groups by GT overlap"
    )
    p.add_argument(
        "--top", type=int, default=2, help="groups to show per module when picking by overlap"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read --weights with the plain, code-running unpickler (only for a file you trust)",
    )
    p.add_argument(
        "--opts",
        dest="opts_flag",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE ... (the same as giving them last, without --opts)",
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ... (last)"
    )
    args = p.parse_args(argv)
    args.opts = args.opts + args.opts_flag
    return args


def fail(message):
    sys.exit(f"visualize_attention: error: {message}")


def ground_truth_masks(json_file, image_paths):
    """file path -> union of its annotations' masks (H x W bool), matched by file name in the COCO JSON."""
    from pycocotools.coco import COCO

    from acm_d2.visualization import ground_truth_mask

    coco = COCO(json_file)
    by_name = {os.path.basename(im["file_name"]): im for im in coco.dataset["images"]}
    masks = {}
    for path in image_paths:
        info = by_name.get(os.path.basename(path))
        if info is None:
            fail(f"image {os.path.basename(path)!r} is not in the annotations {json_file!r}")
        masks[path] = ground_truth_mask(coco, info["id"])
    return masks


def main(argv=None):
    args = parse_args(argv)
    for label, path in [
        ("config file", args.config_file),
        ("weights", args.weights),
        ("annotations", args.annotations),
    ]:
        if path is not None and not os.path.isfile(path):
            fail(f"{label} {path!r} does not exist")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        fail(
            f"--output {args.output!r} is a file; give a folder (it receives one <image name>_attention.png per image)"
        )
    from detectron2.modeling import build_model

    from acm_d2.checkpoint.checkpointer import AtomicCheckpointer, CheckpointError
    from acm_d2.config import load_config
    from acm_d2.data.mapper import read_image

    images = {}
    for path in args.input:
        try:  # training's reader: a 16-bit image is scaled, not clipped
            images[path] = read_image(path, format="BGR")
        except (OSError, ValueError):
            fail(f"input image {path!r} does not exist or is not an image")

    from acm_d2.checkpoint.safe_load import TRUST_ENV
    from acm_d2.utils.device import resolve_device
    from acm_d2.visualization import attention as vis

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = resolve_device(args.device)
    model = build_model(cfg).eval()
    try:
        names = vis.resolve_modules(model, args.module)
    except ValueError as error:
        fail(f"{error} (config {args.config_file})")
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = "1"
    try:  # the weights must fill every parameter: missing ACM weights would draw random attention maps
        AtomicCheckpointer(model, require_complete=True).load(args.weights)
    except CheckpointError as error:
        fail(f"{error} (config {args.config_file})")
    masks = ground_truth_masks(args.annotations, images) if args.annotations else {}

    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as error:
        fail(f"cannot create the --output folder {args.output!r}: {error.strerror}")
    for path, image in images.items():
        maps = vis.capture_attention(
            model, image, names, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        )
        rows = []
        for name in names:
            num_groups = next(iter(maps[name].values())).shape[0]
            if args.group is not None:
                bad = [g for g in args.group if not 0 <= g < num_groups]
                if bad:
                    fail(f"--group {bad}: {name} has groups 0..{num_groups - 1}")
                groups = args.group
            elif path in masks:
                groups = vis.select_groups([maps[name]], [masks[path]], top=args.top)
            else:
                groups = range(num_groups)
            label = vis.short_name(name)
            rows += [
                {
                    "image": image,
                    "maps": maps[name],
                    "group": g,
                    "mask": masks.get(path),
                    "label": label,
                }
                for g in groups
            ]
        out = os.path.join(
            args.output, os.path.splitext(os.path.basename(path))[0] + "_attention.png"
        )
        vis.render_attention(out, rows, title=os.path.basename(path))
        print(
            f"{out}: {', '.join(sorted({r['label'] for r in rows}))}, groups {[r['group'] for r in rows]}"
        )


if __name__ == "__main__":
    main()
