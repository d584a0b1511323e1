"""Reading checkpoint files, and writing any file so that a killed process never leaves half of it."""
import os
import tempfile
from typing import Dict

from .safe_load import UntrustedCheckpointError, load_checkpoint

__all__ = ["read_state_dict", "atomic_write", "check_output_path"]

TMP_SUFFIX = ".tmp"  # atomic_write's temporaries are hidden files ".<name>.<random>.tmp"


def read_state_dict(path: str, trusted=None) -> Dict:
    """The model state dict in a .pth (a dict with "model", or a bare state dict) or a Detectron2 .pkl,
    read without running code from it (acm_d2.checkpoint.safe_load; `trusted` as there).

    A missing file is a FileNotFoundError; an unreadable one (truncated, not a checkpoint), one holding
    no state dict, or one that needs more than weights (UntrustedCheckpointError) is a ValueError; all
    name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = load_checkpoint(path, trusted)
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # truncated or not a checkpoint: say which file and why
        raise ValueError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from e
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no model state dict")
    return state


def check_output_path(output: str, input: str) -> None:
    """Refuse (ValueError) an output path that is the input file (the same path, or the same file through
    a link), a folder, or in a folder that does not exist: said plainly before any work is done."""
    if os.path.exists(output) and os.path.exists(input) and os.path.samefile(output, input):
        raise ValueError(f"the output {output!r} is the input file {input!r}: writing it would destroy the input; give another output path")
    if os.path.isdir(output):
        raise ValueError(f"the output {output!r} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"the output folder {folder!r} does not exist; create it first")


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A reader (or a resumed run) sees the old file or the complete new one, never a partial one. The file
    gets the permissions of any newly created file (0666 less the umask), not mkstemp's private 0600:
    teammates read shared output folders.
    """
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TMP_SUFFIX)
    try:
        if hasattr(os, "fchmod"):  # POSIX; on Windows mkstemp's file is not private to begin with
            os.fchmod(fd, 0o666 & ~_umask())
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


def _umask() -> int:
    """The process umask. Linux shows it in /proc (read-only); elsewhere it can only be read by setting
    it, which this does for an instant."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
