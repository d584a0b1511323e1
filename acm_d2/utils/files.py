"""Writing files so that a killed process never leaves half of one, and checking output paths.

Shared by the checkpointer, the converters, the dataset generator and the self-test.
"""

import os
import tempfile

__all__ = ["atomic_write", "check_output_path", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"  # atomic_write's temporaries are hidden files ".<name>.<random>.tmp"


def check_output_path(output: str, input: str) -> None:
    """Refuse (ValueError) an output path that is the input file (the same path, or the same file through
    a link), a folder, or in a folder that does not exist: said plainly before any work is done."""
    if os.path.exists(output) and os.path.exists(input) and os.path.samefile(output, input):
        raise ValueError(
            f"the output {output!r} is the input file {input!r}: writing it would destroy the input; give another output path"
        )
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
