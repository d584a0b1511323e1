"""Section env: GPU, driver, CUDA, torch, Triton, Detectron2 and Python versions, SM count."""

import platform

import torch

from .. import __version__
from ..layers.acm_fused import triton_available
from .common import Context, log, nvidia_driver, version_of


def section_env(ctx: Context) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": version_of("triton"),
        "triton_available": triton_available(),
        "detectron2": version_of("detectron2"),
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
            driver=nvidia_driver(),
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
