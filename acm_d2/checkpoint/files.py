"""Reading and writing checkpoint files for the converters in tools/."""
import os
import pickle
from typing import Callable, Dict

import torch

__all__ = ["read_state_dict", "write_atomically"]


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


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(temporary_path), then rename it to `path`: an interrupted run never leaves a half-written file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
