"""Reading checkpoint files, and writing any file so that a killed process never leaves half of it."""
import os
import pickle
import tempfile
from typing import Dict

import torch

__all__ = ["read_state_dict", "atomic_write"]

TMP_SUFFIX = ".tmp"  # atomic_write's temporaries are hidden files ".<name>.<random>.tmp"


def read_state_dict(path: str) -> Dict:
    """The model state dict in a .pth (a dict with "model", or a bare state dict) or a Detectron2 .pkl.

    A missing file is a FileNotFoundError; an unreadable one (truncated, not a checkpoint) or one holding
    no state dict is a ValueError; both name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a checkpoint: say which file and why
        raise ValueError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no model state dict")
    return state


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A reader (or a resumed run) sees the old file or the complete new one, never a partial one.
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
