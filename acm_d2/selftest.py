"""GPU self-test: does acm_d2 compute the right thing, train finitely and run fast on this machine?

    python -m acm_d2.selftest [--quick] [--json PATH] [--sections env,correctness,...]

Sections (each runs on CUDA when available; without a GPU, small CPU versions of those that make sense):

  env           GPU, driver, CUDA, torch, Triton, Detectron2 and Python versions, SM count.
  correctness   the fused op (Triton and torch backends) against the reference AttendAndCompare, every
                fused variant, G 8 and 32, fp32/bf16/fp16, y, d, dx and every parameter gradient; plus a
                channels_last and a non-contiguous input through AttendAndCompare(impl="fused").
  amp_training  the demo config (R-18-FPN) on generated data with the project's Trainer, with ACM and
                without, in fp32 and AMP fp16/bf16: does every loss stay finite, and the final losses.
  layer         one ACM, reference vs fused, at the R50-FPN res2-res5 shapes of 2 x 800 x 1216 images:
                median ms, ratio to the memory-traffic floor, launches and host syncs per call.
  model         Mask R-CNN R50-FPN with no context module, reference ACM and fused ACM: training step,
                inference and peak memory, and the kernel-time profile of one fused-ACM training step.

Every section is wrapped: a failing one records its error and the run goes on. The JSON file is rewritten
after each section, so an interrupted run still leaves the finished sections. Progress lines carry the
wall-clock time and the seconds since the start. The exit status is 1 if a section failed or a
correctness check did not pass.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List

import torch

from . import __version__
from .layers.acm import AttendAndCompare
from .layers.acm_fused import FUSED_VARIANTS, acm_fused, triton_available
from .utils.files import atomic_write

__all__ = ["SECTIONS", "run_selftest", "summary_lines", "main"]

_START = time.perf_counter()


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _START:6.1f}s] {message}", flush=True
    )


class Context:
    """What the sections share: the device, --quick, and a scratch folder."""

    def __init__(self, device: str, quick: bool, workdir: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.quick = quick
        self.workdir = workdir


# ----------------------------------------------------------------------------------------------------
# env


def section_env(ctx: Context) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version_of("triton"),
        "triton_available": triton_available(),
        "detectron2": _version_of("detectron2"),
        "acm_d2": __version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            driver=_nvidia_driver(),
        )
    log(
        ", ".join(
            f"{k} {v}"
            for k, v in info.items()
            if k
            in (
                "gpu",
                "sm_count",
                "driver",
                "torch",
                "cuda_runtime",
                "triton",
                "detectron2",
                "python",
            )
        )
    )
    return info


def _version_of(module: str):
    try:
        return __import__(module).__version__
    except Exception as error:  # an absent or broken package is a finding, not a reason to stop
        return f"not importable: {type(error).__name__}: {error}"


def _nvidia_driver():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return (
            out.stdout.strip().splitlines()[0]
            if out.returncode == 0 and out.stdout.strip()
            else None
        )
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------
# correctness

_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@contextlib.contextmanager
def _no_tf32():
    """The reference's convolutions and matmuls in true float32 (cuDNN uses TF32 for convolutions by
    default, which is 1e-3 relative): the checks compare float32 maths, not TF32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference_module(
    variant: str, channels: int, groups: int, device, seed: int = 0
) -> AttendAndCompare:
    """A reference ACM in training mode with non-zero biases (so that they matter)."""
    torch.manual_seed(seed)
    ref = (
        AttendAndCompare(channels, num_groups=groups, variant=variant, impl="reference")
        .to(device)
        .train()
    )
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_()
    return ref


def _outputs(
    forward: Callable, params: List[torch.Tensor], names: List[str], x, dy, dd
) -> Dict[str, torch.Tensor]:
    """y, d and the gradients of sum(y * dy) + sum(d * dd) w.r.t. x and params, by name."""
    x = x.detach().requires_grad_()
    y, d = forward(x)
    loss = (y.float() * dy).sum() + ((d * dd).sum() if d is not None else 0)
    grads = torch.autograd.grad(loss, [x] + params)
    out = {"y": y, "d": d, "dx": grads[0]}
    out.update(zip(names, grads[1:]))
    return out


def _compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype) -> dict:
    """Max relative error per tensor (|got - want| over the largest |want|; for gradients over the largest
    entry of any gradient, the scale of the float32 tolerance) and pass/fail with the CPU
    tests' tolerances (tests/test_layers_acm_fused.py), with every absolute tolerance scaled by the size
    of what it bounds, since these shapes are larger than the tests' and their sums run over more
    positions: float32 inputs rtol 1e-5 and atol 1e-5 times max(1, the largest |y|) for y (likewise d),
    times max(1, the largest entry of any gradient) for gradients; bf16/fp16 inputs against float32 on
    the same values: y within one output ulp (2^-7 / 2^-10), d 1e-5, dx within an ulp of its largest
    entry, parameter gradients rtol 1e-4 and atol 1e-4 times max(1, the largest entry of any gradient)
    (the logits-bias gradients are exactly 0 in the fused form and rounding noise of that size in the
    reference)."""
    grad_names = [n for n in want if n not in ("y", "d")]
    grad_scale = max([1.0] + [want[n].abs().max().item() for n in grad_names])
    errors, failed = {}, []
    for name, w in want.items():
        g = got[name]
        if (g is None) != (w is None):
            failed.append(name)
            continue
        if w is None:
            continue
        g, w = g.float(), w.float()
        scale = grad_scale if name in grad_names else max(1.0, w.abs().max().item())
        if dtype == torch.float32:
            rtol, atol = 1e-5, 1e-5 * scale
        elif name == "y":
            rtol = atol = _ULP[dtype]
        elif name == "d":
            rtol, atol = 1e-5, 1e-5 * scale
        elif name == "dx":
            rtol, atol = 0.0, _ULP[dtype] * w.abs().max().item()
        else:
            rtol, atol = 1e-4, 1e-4 * grad_scale
        diff = (g - w).abs()
        # The logits-bias gradients are exactly 0 in the fused form and rounding noise in the reference:
        # relative to their own size that noise would read as a 100% error.
        errors[name] = diff.max().item() / max(
            w.abs().max().item(), grad_scale if name in grad_names else 0.0, 1e-30
        )
        if not bool((diff <= atol + rtol * w.abs()).all()) or not bool(torch.isfinite(g).all()):
            failed.append(name)
    return {"max_rel_err": errors, "passed": not failed, "failed": failed}


def _check_fused_op(ref: AttendAndCompare, backend: str, x, dy, dd, want: dict, dtype) -> dict:
    q, p1, p2 = ref.q_logits, ref.p_reduce, ref.p_expand
    names = [n for n, _ in ref.named_parameters()]
    params = list(ref.parameters())

    def forward(x):
        return acm_fused(
            x,
            ref.k_logits.weight,
            ref.k_logits.bias,
            q.weight if q else None,
            q.bias if q else None,
            (p1.weight, p1.bias, p2.weight, p2.bias) if p1 is not None else None,
            ref.num_groups,
            need_orth=ref.has_orth_term,
            backend=backend,
        )

    return _compare(_outputs(forward, params, names, x.to(dtype), dy, dd), want, dtype)


def _check_fused_module(ref: AttendAndCompare, x, dy, dd, want: dict) -> dict:
    fused = (
        AttendAndCompare(ref.channels, ref.num_groups, ref.reduction, ref.variant, impl="fused")
        .to(x.device)
        .train()
    )
    fused.load_state_dict(ref.state_dict())
    names = [n for n, _ in fused.named_parameters()]
    return _compare(
        _outputs(lambda x: (fused(x), fused.orth_term), list(fused.parameters()), names, x, dy, dd),
        want,
        x.dtype,
    )


def correctness_cases(ctx: Context):
    """(shapes, groups, backends, dtypes per variant) for this device and mode."""
    if not ctx.cuda:
        return (
            [(2, 64, 12, 20), (1, 64, 7, 9)],
            (8, 32),
            ("torch",),
            {v: (torch.float32, torch.bfloat16) for v in FUSED_VARIANTS},
        )
    backends = ("triton", "torch") if triton_available() else ("torch",)
    # 2x256x24x40; N = 143 (not a multiple of 16) with batch 1; full: one more N not a multiple of 16.
    shapes = [(2, 256, 24, 40), (1, 256, 13, 11)] + ([] if ctx.quick else [(2, 512, 17, 23)])
    low = (torch.bfloat16, torch.float16)
    # --quick: the half-precision inputs on the paper's variant only (fewer Triton compilations).
    dtypes = {
        v: (torch.float32,) + (low if not ctx.quick or v == "full" else ()) for v in FUSED_VARIANTS
    }
    return shapes, (8, 32), backends, dtypes


def section_correctness(ctx: Context) -> dict:
    shapes, group_sizes, backends, dtypes = correctness_cases(ctx)
    checks = []
    with _no_tf32():
        for variant in FUSED_VARIANTS:
            for groups in group_sizes:
                for shape in shapes:
                    ref = _reference_module(variant, shape[1], groups, ctx.device)
                    torch.manual_seed(1)
                    x32 = torch.randn(shape, device=ctx.device) * 2 + 0.5
                    dy32, dd = (
                        torch.randn(shape, device=ctx.device),
                        torch.randn(shape[0], device=ctx.device),
                    )
                    for dtype in dtypes[variant]:
                        # Low precision: the float32 reference on the same (rounded) values.
                        x, dy = x32.to(dtype).float(), dy32.to(dtype).float()
                        want = _outputs(
                            lambda x: (ref(x), ref.orth_term),
                            list(ref.parameters()),
                            [n for n, _ in ref.named_parameters()],
                            x,
                            dy,
                            dd,
                        )
                        for backend in backends:
                            result = _check_fused_op(ref, backend, x, dy, dd, want, dtype)
                            checks.append(
                                {
                                    "path": f"acm_fused[{backend}]",
                                    "variant": variant,
                                    "groups": groups,
                                    "shape": list(shape),
                                    "dtype": _DTYPE_NAMES[dtype],
                                    **result,
                                }
                            )
                    passed = sum(
                        c["passed"]
                        for c in checks
                        if c["variant"] == variant
                        and c["groups"] == groups
                        and c["shape"] == list(shape)
                    )
                    total = sum(
                        1
                        for c in checks
                        if c["variant"] == variant
                        and c["groups"] == groups
                        and c["shape"] == list(shape)
                    )
                    log(
                        f"correctness {variant} G={groups} {'x'.join(map(str, shape))}: {passed}/{total} passed"
                    )
        # Memory layouts the module must accept: channels_last and a non-contiguous view.
        shape = shapes[0]
        ref = _reference_module("full", shape[1], 32, ctx.device)
        torch.manual_seed(2)
        wide = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], device=ctx.device) * 2 + 0.5
        layouts = {
            "channels_last": wide[..., : shape[3]].contiguous(memory_format=torch.channels_last),
            "non_contiguous": wide[..., ::2],
        }
        dy, dd = torch.randn(shape, device=ctx.device), torch.randn(shape[0], device=ctx.device)
        for layout, x in layouts.items():
            want = _outputs(
                lambda x: (ref(x), ref.orth_term),
                list(ref.parameters()),
                [n for n, _ in ref.named_parameters()],
                x.contiguous(),
                dy,
                dd,
            )
            result = _check_fused_module(ref, x, dy, dd, want)
            checks.append(
                {
                    "path": f"AttendAndCompare(impl='fused'), {layout}",
                    "variant": "full",
                    "groups": 32,
                    "shape": list(shape),
                    "dtype": "fp32",
                    **result,
                }
            )
            log(
                f"correctness {layout}: {'passed' if result['passed'] else 'FAILED ' + ', '.join(result['failed'])}"
            )
    failures = [c for c in checks if not c["passed"]]
    return {
        "passed": len(checks) - len(failures),
        "total": len(checks),
        "backends": list(backends),
        "tf32": False,
        "checks": checks,
        "failures": [
            f"{c['path']} {c['variant']} G={c['groups']} {c['dtype']} {c['shape']}: {c['failed']}"
            for c in failures
        ],
    }


# ----------------------------------------------------------------------------------------------------
# amp_training

AMP_PRECISIONS = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}
_DATASET_PREFIX = "acm_selftest"


def section_amp_training(ctx: Context) -> dict:
    """The demo config trained with the project's Trainer; NonFiniteLossError is the finding, not an error."""
    from detectron2.data import DatasetCatalog

    from .benchmark.model import CONFIG_ROOT
    from .config import load_config
    from .data.synthetic import generate_dataset, register_synthetic_dataset
    from .engine import NonFiniteLossError, Trainer

    iterations = 100 if ctx.cuda else 3
    num_images = 64 if ctx.cuda else 8
    data_dir = os.path.join(ctx.workdir, "synthetic")
    if f"{_DATASET_PREFIX}_train" not in DatasetCatalog.list():
        register_synthetic_dataset(
            _DATASET_PREFIX, generate_dataset(data_dir, num_images, 1, image_size=128, seed=0)
        )
    # AMPTrainer asserts CUDA: on the CPU only float32 runs.
    precisions = list(AMP_PRECISIONS) if ctx.cuda else ["fp32"]
    runs = {}
    for module in ("ACM", "none"):
        for precision in precisions:
            cfg = load_config(
                os.path.join(CONFIG_ROOT, "Demo", "mask_rcnn_acm_R_18_FPN_synthetic.yaml"),
                [
                    "MODEL.DEVICE",
                    str(ctx.device),
                    "MODEL.CONTEXT_MODULE",
                    module,
                    "SOLVER.MAX_ITER",
                    iterations,
                    "SOLVER.AMP.ENABLED",
                    AMP_PRECISIONS[precision] is not None,
                    "SOLVER.AMP.PRECISION",
                    AMP_PRECISIONS[precision] or "float16",
                    "DATASETS.TRAIN",
                    (f"{_DATASET_PREFIX}_train",),
                    "DATASETS.TEST",
                    (),
                    "DATALOADER.NUM_WORKERS",
                    1 if ctx.cuda else 0,
                    "OUTPUT_DIR",
                    os.path.join(ctx.workdir, "amp_training"),
                ],
            )
            cfg.freeze()
            label = f"{module} {precision}"
            log(f"amp_training {label}: {iterations} iterations")
            start = time.perf_counter()
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=False)
            result = {
                "module": module,
                "precision": precision,
                "iterations": iterations,
                "finite": True,
                "stopped_at": None,
                "error": None,
            }
            try:
                trainer.train()
            except NonFiniteLossError as error:
                result.update(finite=False, stopped_at=trainer.iter, error=str(error))
            result["final_losses"] = {
                k: v for k, (v, _) in trainer.storage.latest().items() if "loss" in k
            }
            result["seconds"] = time.perf_counter() - start
            runs[label] = result
            log(
                f"amp_training {label}: {'finite' if result['finite'] else 'NON-FINITE at iteration ' + str(result['stopped_at'])}, "
                f"total_loss {result['final_losses'].get('total_loss', float('nan')):.4g}, {result['seconds']:.1f} s"
            )
            del trainer
            if ctx.cuda:
                torch.cuda.empty_cache()
    skipped = (
        []
        if ctx.cuda
        else [f"{m} {p}" for m in ("ACM", "none") for p in AMP_PRECISIONS if p != "fp32"]
    )
    return {"runs": runs, "skipped_without_cuda": skipped, "images": num_images}


# ----------------------------------------------------------------------------------------------------
# layer

# Without a GPU: the same channels at 1/8 of the spatial size.
CPU_LAYER_SHAPES = {
    "res2": (2, 256, 25, 38),
    "res3": (2, 512, 13, 19),
    "res4": (2, 1024, 7, 10),
    "res5": (2, 2048, 4, 5),
}


def section_layer(ctx: Context) -> dict:
    from .benchmark import layer

    shapes = layer.R50_FPN_SHAPES if ctx.cuda else CPU_LAYER_SHAPES
    reps = (10 if ctx.quick else 30) if ctx.cuda else 3
    bandwidth = layer.copy_bandwidth_gbs(ctx.device)
    log(f"layer: measured copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for level, shape in shapes.items():
            rows = layer.benchmark_layer(
                shape,
                dtype,
                ctx.device,
                warmup=2 if ctx.cuda else 1,
                reps=reps,
                bandwidth_gbs=bandwidth,
            )
            for r in rows:
                r.pop("ms_all")
                results.append(
                    {"level": level, "shape": list(shape), "dtype": _DTYPE_NAMES[dtype], **r}
                )
            fused = {r["mode"]: r for r in rows if r["impl"] == "fused"}
            log(
                f"layer {level} {_DTYPE_NAMES[dtype]}: fused fwd {fused['fwd']['median_ms']:.3f} ms ({fused['fwd']['vs_floor']:.1f}x floor), "
                f"fwd+bwd {fused['fwd+bwd']['median_ms']:.3f} ms ({fused['fwd+bwd']['vs_floor']:.1f}x floor, "
                f"{fused['fwd+bwd']['vs_reference']:.2f}x reference)"
            )
    return {
        "copy_bandwidth_gbs": bandwidth,
        "reps": reps,
        "timing": "CUDA events, L2 flushed before each call" if ctx.cuda else "perf_counter",
        "counted": {
            "launches": f"runtime/driver calls named *{layer.LAUNCH_CALL}*",
            "syncs": list(layer.SYNC_CALLS) + ["memcpy DtoH"],
        }
        if ctx.cuda
        else None,
        "results": results,
    }


# ----------------------------------------------------------------------------------------------------
# model


def section_model(ctx: Context) -> dict:
    from .benchmark import model as bench

    if ctx.cuda:
        dtypes = ["fp32", "bf16"] if ctx.quick else ["fp32", "bf16", "fp16"]
        sizes = [
            "--warmup",
            "2" if ctx.quick else "3",
            "--steps",
            "5" if ctx.quick else "10",
            "--inference-images",
            "3" if ctx.quick else "5",
        ]
        opts = []
    else:  # an R-18 at 64 px with few proposals: the CPU version checks that the comparison runs
        dtypes = ["fp32"]
        sizes = [
            "--warmup",
            "1",
            "--steps",
            "1",
            "--inference-images",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--instances",
            "2",
        ]
        opts = [
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "64",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "32",
            "TEST.DETECTIONS_PER_IMAGE",
            "8",
        ]
    out = {"per_dtype": {}}
    for dtype in dtypes:
        args = bench.parse_args(
            [
                "--modules",
                "none",
                "ACM",
                "--acm-impls",
                "reference",
                "fused",
                "--device",
                str(ctx.device),
                "--dtype",
                dtype,
                *sizes,
                *opts,
            ]
        )
        log(
            f"model {dtype}: {args.images} images of {args.height}x{args.width}, {args.steps} timed steps per model"
        )
        try:
            results = bench.run(args)
        except (
            Exception
        ) as error:  # one precision failing (e.g. non-finite fp16 losses) leaves the others
            out["per_dtype"][dtype] = {"error": f"{type(error).__name__}: {error}"}
            log(f"model {dtype}: {type(error).__name__}: {error}")
        else:
            out["per_dtype"][dtype] = {"environment": bench.environment(args), "models": results}
            bench.print_table(bench.environment(args), results)
        if ctx.cuda:
            torch.cuda.empty_cache()
    if ctx.cuda:
        args = bench.parse_args(["--device", str(ctx.device), *opts])
        model, optimizer = bench.build(
            args.config,
            ["MODEL.CONTEXT_MODULE", "ACM", "MODEL.ACM.IMPL", "fused", *opts],
            args.device,
        )
        out["profile_fused_fp32_step"] = profile = bench.profile_train_step(
            model, optimizer, bench.synthetic_batch(args)
        )
        log(
            f"model profile (fused ACM, fp32 step): {profile['kernel_ms']:.1f} ms of kernels, ACM {profile['acm_kernel_ms']:.2f} ms "
            f"({100 * profile['acm_kernel_share']:.1f}%)"
        )
        for k in profile["top_kernels"]:
            log(f"    {k['ms']:8.2f} ms {k['calls']:4d} x {k['name'][:100]}")
    return out


SECTIONS: Dict[str, Callable[[Context], dict]] = {
    "env": section_env,
    "correctness": section_correctness,
    "amp_training": section_amp_training,
    "layer": section_layer,
    "model": section_model,
}


# ----------------------------------------------------------------------------------------------------
# runner, report


def _json_safe(value):
    """Non-finite floats as strings ("nan", "inf"), so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _save(report: dict, path: str) -> None:
    if path:
        text = json.dumps(_json_safe(report), indent=1, allow_nan=False)
        atomic_write(path, lambda f: f.write(text), "w")


def run_selftest(args) -> dict:
    """Run the chosen sections in order; return the report (also written to args.json after each section)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": vars(args),
        "device": device,
        "quick": args.quick,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else (platform.processor() or platform.machine()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version_of("triton"),
            "detectron2": _version_of("detectron2"),
            "acm_d2": __version__,
        },
        "sections": {},
    }
    if device == "cpu":
        log("no GPU found: running the CPU versions (small shapes; the timings say little)")
    log(
        f"selftest on {report['device_name']}{' (--quick)' if args.quick else ''}: {', '.join(args.sections)}"
    )
    with tempfile.TemporaryDirectory(prefix="acm_selftest_") as workdir:
        ctx = Context(device, args.quick, workdir)
        for name in args.sections:
            log(f"== {name}")
            start = time.perf_counter()
            try:
                result = {"status": "ok", **SECTIONS[name](ctx)}
            except (
                Exception
            ) as error:  # the section's failure is the finding; the next sections still run
                result = {
                    "status": "error",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                }
                log(f"{name} FAILED: {result['error']}")
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["sections"][name] = result
            report["total_seconds"] = round(time.perf_counter() - _START, 1)
            _save(report, args.json)
            log(f"== {name} {result['status']} in {result['seconds']} s")
    report["summary"] = summary_lines(report)
    _save(report, args.json)
    print("\n".join(report["summary"]), flush=True)
    return report


def summary_lines(report: dict) -> List[str]:
    """The headline figures of the sections that ran, as printed at the end."""
    s = report["sections"]
    lines = [
        f"==== acm_d2 selftest: {report['device_name']} ({report['device']}), torch {report['versions']['torch']}, "
        f"triton {report['versions']['triton']}, {report.get('total_seconds', 0):.0f} s"
    ]
    for name, section in s.items():
        if section["status"] != "ok":
            lines.append(f"{name:<13} ERROR {section['error'][:200]}")
    if s.get("correctness", {}).get("status") == "ok":
        c = s["correctness"]
        per = {}
        for check in c["checks"]:
            key = (check["path"].split(",")[0], check["dtype"])
            ok, n = per.get(key, (0, 0))
            per[key] = (ok + check["passed"], n + 1)
        lines.append(
            f"correctness   {c['passed']}/{c['total']} passed: "
            + ", ".join(f"{p} {d} {ok}/{n}" for (p, d), (ok, n) in per.items())
        )
        lines += [f"  FAILED {f}" for f in c["failures"][:10]]
    if s.get("amp_training", {}).get("status") == "ok":
        runs = s["amp_training"]["runs"]
        lines.append(
            "amp_training  "
            + ", ".join(
                f"{label} {'finite' if r['finite'] else 'NaN/inf@' + str(r['stopped_at'])}"
                for label, r in runs.items()
            )
        )
    if s.get("layer", {}).get("status") == "ok":
        layer = s["layer"]
        lines.append(
            f"layer         copy bandwidth {layer['copy_bandwidth_gbs']:.0f} GB/s; fused ms (x floor) [x reference], launches/syncs, host / kernel ms per call"
        )
        for r in layer["results"]:
            if r["impl"] == "fused":
                counts = (
                    f", {r['launches']:.0f}/{r['syncs']:.0f}, {r['host_ms']:.3f} / {r['kernel_ms']:.3f}"
                    if "launches" in r
                    else ""
                )
                lines.append(
                    f"  {r['level']} {r['dtype']:<4} {r['mode']:<8} {r['median_ms']:8.3f} ms ({r['vs_floor']:6.1f}x) [{r['vs_reference']:.2f}x]{counts}"
                )
    if s.get("model", {}).get("status") == "ok":
        m = s["model"]
        lines.append("model         ratios to none: train step / inference / peak memory")
        for dtype, res in m["per_dtype"].items():
            if "error" in res:
                lines.append(f"  {dtype}: ERROR {res['error'][:150]}")
                continue
            for r in res["models"]:
                mem = f"{r['peak_memory_ratio']:.2f}" if r["peak_memory_ratio"] is not None else "-"
                lines.append(
                    f"  {dtype:<4} {r['model']:<16} step {r['train_step_ms']:8.1f} ms {r['train_step_ratio']:5.2f}x, "
                    f"infer {r['inference_ms_per_image']:7.1f} ms {r['inference_ratio']:5.2f}x, memory {mem}x"
                )
        if "profile_fused_fp32_step" in m:
            p = m["profile_fused_fp32_step"]
            lines.append(
                f"  fused ACM share of the fp32 step's kernel time: {p['acm_kernel_ms']:.2f} of {p['kernel_ms']:.1f} ms "
                f"({100 * (p['acm_kernel_share'] or 0):.1f}%)"
            )
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes, dtypes and repetitions (about 4 min on one H100)",
    )
    parser.add_argument(
        "--json",
        default="acm_selftest.json",
        help="report file, rewritten after each section ('' for none)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    return args


def main(argv=None) -> int:
    report = run_selftest(parse_args(argv))
    bad = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    failed_checks = report["sections"].get("correctness", {}).get("failures", [])
    return 1 if bad or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
