#!/usr/bin/env python
"""Convert a torchvision ImageNet ResNet / ResNeXt checkpoint (resnet50, resnet101, resnext101_32x8d, ...)
to a Detectron2 model-zoo .pkl that any acm_d2 or Detectron2 ResNet config loads as MODEL.WEIGHTS.

    python tools/convert_torchvision_weights.py ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth R-50-tv.pkl
    python tools/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml \
        MODEL.WEIGHTS R-50-tv.pkl <the options this tool prints>

The .pkl holds the trunk only (fc dropped) under Detectron2's ResNet names, with "matching_heuristics",
so Detectron2 finds each key's place in any model (backbone.bottom_up.* for FPN, roi_heads.res5.* for C4);
the context modules (ACM, ...) and the heads stay as initialised. The tool prints the config options the
weights need (STRIDE_IN_1X1 False, torchvision's mean / std, depth and groups read from the tensors);
see acm_d2/checkpoint/torchvision.py.
"""

import argparse
import pickle
import sys

from acm_d2.checkpoint.read import read_state_dict
from acm_d2.checkpoint.safe_load import TRUST_FLAG_HELP
from acm_d2.checkpoint.torchvision import (
    INPUT_FORMATS,
    convert_torchvision_state_dict,
    torchvision_config,
)
from acm_d2.utils.files import atomic_write, check_output_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "input",
        help="a torchvision state dict (.pth), e.g. from torchvision.models.resnet50(weights=...)",
    )
    parser.add_argument("output", help="where to write the Detectron2 .pkl")
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="BGR",
        help="the image channel order the model will be fed (INPUT.FORMAT); BGR, the default, reverses the first conv's input channels",
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        raise SystemExit(
            f"error: {args.output}: the output must end in .pkl (Detectron2 reads the key-matching flag from .pkl files)"
        )
    try:
        check_output_path(args.output, args.input)
        state = read_state_dict(args.input, trusted=args.trust_checkpoint or None)
        converted = convert_torchvision_state_dict(state, args.input_format)
        opts = torchvision_config(state, args.input_format)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {args.input}: {e}")
    checkpoint = {
        "model": {k: v.numpy() for k, v in converted.items()},
        "__author__": "torchvision (acm_d2 tools/convert_torchvision_weights.py)",
        "matching_heuristics": True,
    }
    atomic_write(args.output, lambda f: pickle.dump(checkpoint, f))
    print(f"wrote {args.output}: {len(converted)} tensors", file=sys.stderr)
    print("config options for these weights (append to the train_net.py command line):")
    print(" ".join(f"{k} {str(v).replace(' ', '')}" for k, v in zip(opts[::2], opts[1::2])))


if __name__ == "__main__":
    main()
