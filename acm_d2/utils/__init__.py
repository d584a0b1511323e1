"""Small helpers shared across acm_d2's rooms (no Detectron2 import)."""
