#!/usr/bin/env python
"""Convert the authors' released ACM checkpoint to acm_d2's layout. Their code and the link to the
checkpoint: https://github.com/mk-minchul/attend-and-compare (coco/README.md; docs/configs.md).

    python tools/convert_official_acm.py acm_r50_fpn_1x.pth acm_r50_fpn_1x_acm_d2.pth
    python tools/train_net.py --eval-only \
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x_official.yaml \
        MODEL.WEIGHTS acm_r50_fpn_1x_acm_d2.pth

Reads a .pth (a dict with "model", or a bare state dict) or a Detectron2 .pkl; writes a .pth with
"model" only (the optimizer and iteration of the authors' run are dropped, so training from it starts
at iteration 0). The output is written to a temporary file and renamed, so it is never half-written.
"""

import argparse
import sys

import torch

from acm_d2.checkpoint.official import convert_official_state_dict
from acm_d2.checkpoint.read import read_state_dict
from acm_d2.checkpoint.safe_load import TRUST_FLAG_HELP
from acm_d2.utils.files import atomic_write, check_output_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="the authors' checkpoint (.pth or .pkl)")
    parser.add_argument("output", help="where to write the converted .pth")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    args = parser.parse_args(argv)
    try:
        check_output_path(args.output, args.input)
        state = read_state_dict(args.input, trusted=args.trust_checkpoint or None)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    try:
        converted = convert_official_state_dict(state)
    except ValueError as e:
        raise SystemExit(f"error: {args.input}: {e}")
    checkpoint = {"model": converted, "__author__": "acm_d2 tools/convert_official_acm.py"}
    atomic_write(args.output, lambda f: torch.save(checkpoint, f))
    num_acm = sum(".context." in k for k in converted)
    print(
        f"wrote {args.output}: {len(converted)} tensors, {num_acm} of them ACM parameters",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
