"""Config and dataset set-up shared by tools/train_net.py, tools/lazyconfig_train_net.py and the demo."""

import argparse
import os

from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import AtomicCheckpointer, CheckpointError
from ..checkpoint.safe_load import TRUST_ENV, TRUST_FLAG_HELP
from ..config import load_config
from ..data.datasets import register_coco_dataset
from ..data.validate import AUTO_CHECK_MAX_IMAGES
from ..utils.device import runnable_device
from .cluster import DEFAULT_RENDEZVOUS_TIMEOUT_S
from .output_lock import lock_output_dir_on_main_process

__all__ = [
    "argument_parser",
    "setup",
    "setup_lazy",
    "register_datasets",
    "load_weights_for_evaluation",
    "add_inference_weights_arguments",
    "load_weights_for_inference",
]


def argument_parser(epilog=None):
    """Detectron2's default_argument_parser plus `--coco-dataset NAME JSON IMAGE_ROOT` (repeatable),
    `--trust-checkpoint`, `--allow-random-weights` and `--rendezvous-timeout`; `--num-gpus` defaults to
    None (one process), so that launch_from_args can refuse it under torchrun."""
    parser = default_argument_parser(epilog)
    parser.set_defaults(num_gpus=None)
    parser.add_argument(
        "--rendezvous-timeout",
        type=float,
        default=DEFAULT_RENDEZVOUS_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun or srun: how long a process waits for the others at the rendezvous "
        "(MASTER_ADDR:MASTER_PORT) before it fails naming them",
    )
    add_inference_weights_arguments(
        parser,
        random_weights_help="with --eval-only: evaluate even without weights, or with weights that leave "
        "parameters at their random initialisation (e.g. to time the pipeline); refused by default",
    )
    parser.add_argument(
        "--coco-dataset",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset that DATASETS.TRAIN / DATASETS.TEST can then name",
    )
    parser.add_argument(
        "--check-images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="when a --coco-dataset is loaded, open every image's header (in parallel) and drop, with a "
        "warning, files that are empty, not images, truncated or of another size than the JSON says. "
        f"Default: only for datasets of at most {AUTO_CHECK_MAX_IMAGES} images",
    )
    return parser


def register_datasets(args) -> None:
    for name, json_file, image_root in args.coco_dataset:
        register_coco_dataset(name, json_file, image_root, check_images=args.check_images)


def setup(args):
    """The config from args (acm_d2 keys added, file and overrides merged), frozen, with logging set up.

    A config asking for CUDA on a machine without it falls back to the CPU with a warning, so that
    the shipped configs run anywhere. OUTPUT_DIR is locked for this run (acm_d2.engine.output_lock)
    before anything is written there.
    """
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    _trust_checkpoints_if_asked(args)
    lock_output_dir_on_main_process(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    # default_setup logs "detectron2" and "fvcore"; acm_d2's own messages go to the same console and log file.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="acm_d2")
    return cfg


def setup_lazy(args):
    """setup() for a Python (LazyConfig) config file: loaded, `key=value` overrides applied, the same
    CPU fallback (train.device), logging set up."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    cfg.train.device = runnable_device(cfg.train.device, "train.device")
    _trust_checkpoints_if_asked(args)
    lock_output_dir_on_main_process(cfg.train.output_dir)
    default_setup(cfg, args)
    return cfg


def _trust_checkpoints_if_asked(args) -> None:
    """--trust-checkpoint: every checkpoint this process reads may run code (acm_d2.checkpoint.safe_load)."""
    if getattr(args, "trust_checkpoint", False):
        os.environ[TRUST_ENV] = "1"


def load_weights_for_evaluation(
    model, weights: str, output_dir: str, args, weights_key="MODEL.WEIGHTS"
) -> None:
    """Load the weights --eval-only scores: `weights`, or with --resume the last checkpoint of output_dir.

    Without weights, or with weights that leave parameters at their initialisation (an ImageNet or
    baseline checkpoint for an ACM model, another NUM_CLASSES), the evaluated model would be partly or
    wholly random: a CheckpointError, unless args.allow_random_weights.
    """
    allow_random = getattr(args, "allow_random_weights", False)
    checkpointer = AtomicCheckpointer(model, save_dir=output_dir, require_complete=not allow_random)
    if not weights and not (args.resume and checkpointer.has_checkpoint()) and not allow_random:
        raise CheckpointError(
            f"--eval-only without weights would score a randomly initialised model: set {weights_key} to a trained "
            "checkpoint (e.g. OUTPUT_DIR/model_final.pth), or pass --resume to use the last checkpoint of "
            f"{output_dir}, or --allow-random-weights to evaluate a random model on purpose"
        )
    checkpointer.resume_or_load(weights, resume=args.resume)


def add_inference_weights_arguments(
    parser,
    random_weights_help="run without MODEL.WEIGHTS, or with weights that leave parameters at their random "
    "initialisation (a baseline checkpoint under an ACM config, another NUM_CLASSES); refused by default",
) -> None:
    """`--trust-checkpoint` and `--allow-random-weights`: train_net's (for --eval-only), predict's and
    export's, one definition for all three."""
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    parser.add_argument("--allow-random-weights", action="store_true", help=random_weights_help)


def load_weights_for_inference(model, weights: str, args, weights_key="MODEL.WEIGHTS") -> None:
    """Load `weights` into `model` for predict and export, refusing what --eval-only refuses: no weights,
    or weights that leave any parameter at its random initialisation (CheckpointError naming the file
    and keys), unless args.allow_random_weights. Honours args.trust_checkpoint."""
    _trust_checkpoints_if_asked(args)
    allow_random = getattr(args, "allow_random_weights", False)
    if not weights:
        if allow_random:
            return
        raise CheckpointError(
            f"{weights_key} is empty: the model would be randomly initialised; set {weights_key} to a "
            "trained checkpoint (e.g. OUTPUT_DIR/model_final.pth), or pass --allow-random-weights to run a "
            "random model on purpose"
        )
    AtomicCheckpointer(model, require_complete=not allow_random).load(weights)
