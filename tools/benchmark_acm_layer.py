#!/usr/bin/env python
"""Micro-benchmark of one ACM layer: reference vs fused, forward (eval, no grad) and forward+backward,
medians, ratios to the reference and to the memory-traffic floor, launches and host syncs per call (CUDA).
The logic lives in acm_d2/benchmark/layer.py.

    python tools/benchmark_acm_layer.py                       # CUDA, 2x256x200x304 (res2 of an 800x1216 pair)
    python tools/benchmark_acm_layer.py --device cpu          # CPU, 2x256x50x76
"""

from acm_d2.benchmark.layer import main

if __name__ == "__main__":
    main()
