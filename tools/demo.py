#!/usr/bin/env python
"""The demo: train and evaluate a small ACM Mask R-CNN on the generated comparison dataset on a CPU
(or GPU), then draw its loss curve and attention maps. See acm_d2/engine/demo.py for what it writes.

    python tools/demo.py --output output/demo
    python tools/demo.py --output output/demo-compare --compare
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from acm_d2.engine.demo import main  # noqa: E402

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "Demo", "mask_rcnn_acm_R_18_FPN_synthetic.yaml"
)

if __name__ == "__main__":
    main(default_config=DEFAULT_CONFIG)
