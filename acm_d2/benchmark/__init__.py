"""Speed measurements shared by tools/benchmark_model.py, tools/benchmark_acm_layer.py and acm_d2.selftest:
`layer` (one ACM layer against the memory-traffic floor) and `model` (whole Detectron2 models side by side)."""
