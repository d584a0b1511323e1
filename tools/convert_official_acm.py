#!/usr/bin/env python
"""Convert the authors' released ACM checkpoint to acm_d2's layout.

    python tools/convert_official_acm.py acm_r50_fpn_1x.pth acm_r50_fpn_1x_acm_d2.pth
    python tools/train_net.py --eval-only \
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x_official.yaml \
        MODEL.WEIGHTS acm_r50_fpn_1x_acm_d2.pth

Reads a .pth (a dict with "model", or a bare state dict) or a Detectron2 .pkl; writes a .pth with
"model" only (the optimizer and iteration of the authors' run are dropped, so training from it starts
at iteration 0). The output is written to a temporary file and renamed, so it is never half-written.
"""
import argparse
import os
import pickle
import sys

import torch

from acm_d2.checkpoint.official import convert_official_state_dict


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a checkpoint: say which file and why
        raise SystemExit(f"error: cannot read {path} as a checkpoint ({type(e).__name__}: {e})")
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise SystemExit(f"error: {path} holds no model state dict")
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the authors' checkpoint (.pth or .pkl)")
    parser.add_argument("output", help="where to write the converted .pth")
    args = parser.parse_args(argv)
    state = load_checkpoint(args.input)
    try:
        converted = convert_official_state_dict(state)
    except ValueError as e:
        raise SystemExit(f"error: {args.input}: {e}")
    tmp = args.output + ".tmp"
    torch.save({"model": converted, "__author__": "acm_d2 tools/convert_official_acm.py"}, tmp)
    os.replace(tmp, args.output)
    num_acm = sum(".context." in k for k in converted)
    print(f"wrote {args.output}: {len(converted)} tensors, {num_acm} of them ACM parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
