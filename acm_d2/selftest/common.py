"""What the self-test's sections share: progress lines, the context, version look-ups, JSON output."""

import json
import math
import subprocess
import time

import torch

from ..utils.files import atomic_write

START = time.perf_counter()
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def log(message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", flush=True
    )


class Context:
    """What the sections share: the device, --quick, a scratch folder and where to keep the memory
    snapshot (None: not kept)."""

    def __init__(self, device: str, quick: bool, workdir: str, snapshot_dir=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.quick = quick
        self.workdir = workdir
        self.snapshot_dir = snapshot_dir


def version_of(module: str):
    try:
        return __import__(module).__version__
    except Exception as error:  # an absent or broken package is a finding, not a reason to stop
        return f"not importable: {type(error).__name__}: {error}"


def nvidia_driver():
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


def json_safe(value):
    """Non-finite floats as strings ("nan", "inf"), so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save(report: dict, path: str) -> None:
    if path:
        text = json.dumps(json_safe(report), indent=1, allow_nan=False)
        atomic_write(path, lambda f: f.write(text), "w")
