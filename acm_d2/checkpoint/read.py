"""Reading checkpoint files without running code from them."""

import os
from typing import Dict

from .safe_load import CheckpointError, load_checkpoint

__all__ = ["read_state_dict"]


def read_state_dict(path: str, trusted=None) -> Dict:
    """The model state dict in a .pth (a dict with "model", or a bare state dict) or a Detectron2 .pkl,
    read without running code from it (acm_d2.checkpoint.safe_load; `trusted` as there).

    A missing file is a FileNotFoundError; an unreadable one (truncated, not a checkpoint), one holding
    no state dict, or one refused by the safe loader (CheckpointError: it needs more than weights or
    is built to exhaust the reader) is a ValueError; all name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = load_checkpoint(path, trusted)
    except CheckpointError:  # refused, naming the file and why
        raise
    except Exception as e:  # truncated or not a checkpoint: say which file and why
        raise ValueError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no model state dict")
    return state
