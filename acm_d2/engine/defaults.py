"""Config and dataset set-up shared by tools/train_net.py, tools/lazyconfig_train_net.py and the demo."""
import logging

import torch
from detectron2.config import LazyConfig, get_cfg
from detectron2.engine import default_argument_parser, default_setup

from ..config import add_acm_config
from ..data.datasets import register_coco_dataset

__all__ = ["argument_parser", "setup", "setup_lazy", "register_datasets"]


def argument_parser(epilog=None):
    """Detectron2's default_argument_parser plus `--coco-dataset NAME JSON IMAGE_ROOT` (repeatable)."""
    parser = default_argument_parser(epilog)
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset that DATASETS.TRAIN / DATASETS.TEST can then name",
    )
    return parser


def register_datasets(args) -> None:
    for name, json_file, image_root in args.coco_dataset:
        register_coco_dataset(name, json_file, image_root)


def setup(args):
    """The config from args (acm_d2 keys added, file and overrides merged), frozen, with logging set up.

    A config asking for CUDA on a machine without it falls back to the CPU with a warning, so that
    the shipped configs run anywhere.
    """
    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE, fallback = _available(cfg.MODEL.DEVICE)
    cfg.freeze()
    default_setup(cfg, args)
    if fallback:
        logging.getLogger("acm_d2").warning("CUDA is not available: running on the CPU (MODEL.DEVICE cpu)")
    return cfg


def setup_lazy(args):
    """setup() for a Python (LazyConfig) config file: loaded, `key=value` overrides applied, the same
    CPU fallback (train.device), logging set up."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    cfg.train.device, fallback = _available(cfg.train.device)
    default_setup(cfg, args)
    if fallback:
        logging.getLogger("acm_d2").warning("CUDA is not available: running on the CPU (train.device cpu)")
    return cfg


def _available(device: str):
    """(device, False), or ("cpu", True) for a CUDA device on a machine without CUDA."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu", True
    return device, False
