#!/usr/bin/env python
"""Side-by-side speed and memory of Detectron2 models with different context modules (the logic lives in
acm_d2/benchmark/model.py; its docstring says how the models are timed).

    # the context modules on one backbone (the first one listed is the baseline of the ratios)
    python tools/benchmark_model.py --modules none ACM SE GC NL CC
    # the plain (reference) ACM against the fused one
    python tools/benchmark_model.py --modules none ACM --acm-impls reference fused
    # or whole configs
    python tools/benchmark_model.py --configs configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
        configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml --dtype bf16 --json bench.json
"""

from acm_d2.benchmark.model import main

if __name__ == "__main__":
    main()
