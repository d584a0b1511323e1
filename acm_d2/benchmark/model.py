"""Side-by-side speed and memory of Detectron2 models with different context modules.

    # the context modules on one backbone (the first one listed is the baseline of the ratios)
    python tools/benchmark_model.py --modules none ACM SE GC NL CC
    # the plain (reference) ACM against the fused one
    python tools/benchmark_model.py --modules none ACM --acm-impls reference fused
    # or whole configs
    python tools/benchmark_model.py --configs configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
        configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml --dtype bf16 --json bench.json

Every model gets the same synthetic batches (random images, random boxes with box-shaped masks) and
random weights; the learning rate is 0, so the weights (and the work) stay the same for every step. The
models are timed interleaved, one step of each in turn, so drifting clocks and noisy neighbours hit
them alike; the table gives medians and each one's ratio to the first model. Training step = forward,
backward and SGD step. Peak memory is the CUDA allocator's peak for one training step (CPU: not
measured). Absolute times mean something only on a GPU; on the CPU read the ratios.

Where a step's time and memory go (host time per ACM call, GPU time per kernel, the tensors at the
memory peak): the self-test's breakdown section, `python -m acm_d2.selftest --sections breakdown`.
"""

import argparse
import json
import os
import platform
import statistics
import time

import detectron2
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from .. import __version__ as acm_d2_version
from ..config import load_config

# The configs live in the source checkout beside the package (they are not installed with it).
CONFIG_ROOT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
DEFAULT_CONFIG = os.path.join(
    CONFIG_ROOT, "COCO-InstanceSegmentation", "mask_rcnn_acm_R_50_FPN_1x.yaml"
)
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--configs", nargs="+", help="config files to compare (the first is the baseline)"
    )
    what.add_argument(
        "--modules", nargs="+", help="MODEL.CONTEXT_MODULE values on --config (default: none ACM)"
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the config --modules varies")
    parser.add_argument(
        "--recompute",
        nargs="*",
        metavar="IMPL",
        help="with --modules: these ACM impls (none named: all) also with MODEL.CONTEXT_RECOMPUTE True",
    )
    parser.add_argument(
        "--acm-impls",
        nargs="+",
        default=["auto"],
        help="with --modules: one ACM model per MODEL.ACM.IMPL",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype of the step"
    )
    parser.add_argument(
        "--height", type=int, help="image height (default: 800 on CUDA, 256 on CPU)"
    )
    parser.add_argument("--width", type=int, help="image width (default: 1216 on CUDA, 384 on CPU)")
    parser.add_argument("--images", type=int, default=2, help="images per batch")
    parser.add_argument("--instances", type=int, default=8, help="ground-truth instances per image")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument(
        "--inference-images", type=int, default=5, help="timed single-image inferences per model"
    )
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides for every model (KEY VALUE ...)"
    )
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.height = args.height or (800 if on_cuda else 256)
    args.width = args.width or (1216 if on_cuda else 384)
    return args


def model_specs(args):
    """(label, config file, extra overrides) for each model, baseline first."""
    if args.configs:
        return [(os.path.basename(c).rsplit(".", 1)[0], c, []) for c in args.configs]
    specs = []
    for module in args.modules or ["none", "ACM"]:
        if module == "ACM":
            for impl in args.acm_impls:
                opts = ["MODEL.CONTEXT_MODULE", module, "MODEL.ACM.IMPL", impl]
                specs.append((f"ACM ({impl})", args.config, opts))
                if args.recompute is not None and impl in (args.recompute or args.acm_impls):
                    specs.append(
                        (
                            f"ACM ({impl}, recompute)",
                            args.config,
                            [*opts, "MODEL.CONTEXT_RECOMPUTE", True],
                        )
                    )
        else:
            specs.append((module, args.config, ["MODEL.CONTEXT_MODULE", module]))
    return specs


def build(config_file, opts, device):
    # Score threshold 0: every model keeps its full quota of detections at inference, so the heads do the
    # same work whatever scores the random weights give (else the mask head's cost varies between models).
    cfg = load_config(
        config_file,
        [
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            device,
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            0.0,
            "MODEL.RETINANET.SCORE_THRESH_TEST",
            0.0,
            *opts,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    # lr 0: every step does the full SGD work while the random weights, and so the work, stay fixed.
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9
    )
    return model, optimizer


def synthetic_batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w, n = args.height, args.width, args.instances
    batch = []
    for _ in range(args.images):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(n, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances(
            (h, w), gt_boxes=Boxes(boxes), gt_classes=torch.randint(0, 80, (n,), generator=g)
        )
        instances.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


class Timer:
    """Wall time of a block, waiting for the GPU's queue on both ends."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def train_step(model, optimizer, batch, dtype, scaler):
    with torch.autocast(
        device_type=next(model.parameters()).device.type, dtype=dtype, enabled=dtype is not None
    ):
        losses = model(batch)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        bad = sorted(k for k, v in losses.items() if not torch.isfinite(v))
        raise FloatingPointError(f"non-finite training losses: {bad}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def run(args):
    dtype = DTYPES[args.dtype]
    batch = synthetic_batch(args)
    inference_inputs = [{k: v for k, v in d.items() if k != "instances"} for d in batch[:1]]
    specs = model_specs(args)
    models = {label: build(c, [*opts, *args.opts], args.device) for label, c, opts in specs}
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.dtype == "fp16")
    timer = Timer(args.device)
    step_times = {label: [] for label in models}
    infer_times = {label: [] for label in models}
    peak = {}
    with EventStorage():
        for label, (model, optimizer) in models.items():
            model.train()
            for _ in range(args.warmup):
                train_step(model, optimizer, batch, dtype, scaler)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                train_step(model, optimizer, batch, dtype, scaler)
                peak[label] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for _ in range(args.steps):
            for label, (model, optimizer) in models.items():
                with timer:
                    train_step(model, optimizer, batch, dtype, scaler)
                step_times[label].append(timer.seconds * 1e3)
        for label, (model, _) in models.items():
            model.eval()
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=args.device.split(":")[0], dtype=dtype, enabled=dtype is not None
            ),
        ):
            for label, (model, _) in models.items():  # warm-up
                model(inference_inputs)
            for _ in range(args.inference_images):
                for label, (model, _) in models.items():
                    with timer:
                        model(inference_inputs)
                    infer_times[label].append(timer.seconds * 1e3)
    results = []
    base_label = specs[0][0]
    for label, _, _ in specs:
        step, infer = statistics.median(step_times[label]), statistics.median(infer_times[label])
        results.append(
            {
                "model": label,
                "train_step_ms": step,
                "train_step_ratio": step / statistics.median(step_times[base_label]),
                "train_step_ms_min_max": [min(step_times[label]), max(step_times[label])],
                "train_step_ms_all": step_times[label],
                "peak_memory_gib": peak.get(label),
                "peak_memory_ratio": peak[label] / peak[base_label] if label in peak else None,
                "inference_ms_per_image": infer,
                "inference_ratio": infer / statistics.median(infer_times[base_label]),
                "inference_ms_min_max": [min(infer_times[label]), max(infer_times[label])],
                "parameters": sum(p.numel() for p in models[label][0].parameters()),
            }
        )
    return results


def environment(args):
    device = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    return {
        "device": device,
        "device_type": args.device,
        "dtype": args.dtype,
        "image_size": [args.height, args.width],
        "images_per_batch": args.images,
        "instances_per_image": args.instances,
        "steps": args.steps,
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "acm_d2": acm_d2_version,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }


def print_table(env, results):
    print(
        f"device: {env['device']} ({env['device_type']}), dtype {env['dtype']}, "
        f"{env['images_per_batch']} images of {env['image_size'][0]}x{env['image_size'][1]}, torch {env['torch']}"
    )
    header = f"{'model':<28}{'step ms':>10}{'min-max':>16}{'x base':>8}{'peak GiB':>10}{'x base':>8}{'infer ms':>10}{'x base':>8}{'params M':>10}"
    print(header)
    for r in results:
        mem = (
            f"{r['peak_memory_gib']:>10.2f}{r['peak_memory_ratio']:>8.2f}"
            if r["peak_memory_gib"] is not None
            else f"{'-':>10}{'-':>8}"
        )
        print(
            f"{r['model']:<28}{r['train_step_ms']:>10.1f}"
            f"{'%.1f-%.1f' % tuple(r['train_step_ms_min_max']):>16}{r['train_step_ratio']:>8.2f}{mem}"
            f"{r['inference_ms_per_image']:>10.1f}{r['inference_ratio']:>8.2f}{r['parameters'] / 1e6:>10.2f}"
        )


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    env = environment(args)
    print_table(env, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "models": results}, f, indent=2)
    return env, results
