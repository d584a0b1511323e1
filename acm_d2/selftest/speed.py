"""Sections layer (one ACM against the memory-traffic floor) and model (Mask R-CNN R50-FPN side by side)."""

import torch

from .common import DTYPE_NAMES, Context, log

# Without a GPU: the same channels at 1/8 of the spatial size.
CPU_LAYER_SHAPES = {
    "res2": (2, 256, 25, 38),
    "res3": (2, 512, 13, 19),
    "res4": (2, 1024, 7, 10),
    "res5": (2, 2048, 4, 5),
}


def section_layer(ctx: Context) -> dict:
    from ..benchmark import layer

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
                    {"level": level, "shape": list(shape), "dtype": DTYPE_NAMES[dtype], **r}
                )
            fused = {r["mode"]: r for r in rows if r["impl"] == "fused"}
            log(
                f"layer {level} {DTYPE_NAMES[dtype]}: fused fwd {fused['fwd']['median_ms']:.3f} ms ({fused['fwd']['vs_floor']:.1f}x floor), "
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


# Without a GPU: an R-18 at 64 px with few proposals (the CPU versions check that the comparisons run).
CPU_MODEL_SIZES = ["--height", "64", "--width", "64", "--images", "1", "--instances", "2"]
CPU_MODEL_OPTS = [
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


def model_args(ctx: Context, *argv: str) -> list:
    """tools/benchmark_model.py arguments for this device: the device, and the CPU version's sizes."""
    return ["--device", str(ctx.device), *argv] + (
        [] if ctx.cuda else [*CPU_MODEL_SIZES, *CPU_MODEL_OPTS]
    )


def section_model(ctx: Context) -> dict:
    """Mask R-CNN R50-FPN without ACM, with the reference and the fused ACM, and the fused ACM with
    MODEL.CONTEXT_RECOMPUTE True (what its memory saving costs in time): at least 20 timed steps per
    model on a GPU (the issue's count; --quick 10)."""
    from ..benchmark import model as bench

    if ctx.cuda:
        dtypes = ["fp32", "bf16"] if ctx.quick else ["fp32", "bf16", "fp16"]
        counts = ["--warmup", "3", "--steps", "10" if ctx.quick else "20"]
        counts += ["--inference-images", "10" if ctx.quick else "20"]
    else:
        dtypes = ["fp32"]
        counts = ["--warmup", "1", "--steps", "1", "--inference-images", "1"]
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
                "--recompute",
                "fused",
                "--dtype",
                dtype,
                *counts,
                *model_args(ctx),
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
    return out
