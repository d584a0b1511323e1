"""One OUTPUT_DIR, one run.

Two runs writing to one folder interleave their checkpoints, `last_checkpoint`, metrics.json and
config.yaml without any error, and a `--resume` started while another run saves deletes that run's
temporary checkpoint file (and with it the run). So the main process of a run takes an exclusive lock on
its OUTPUT_DIR before it writes anything there, and keeps it until it exits:

* an OS lock (fcntl.flock on OUTPUT_DIR/.acm_d2_run.lock): the kernel releases it when the process ends,
  however it ends, so a crashed or killed run never leaves a stale lock; the file itself stays (it is
  never deleted, which would let two runs lock two different files of that name);
* the file says who holds it (pid, host, start time, command), so a refused run can say so;
* in a multi-process run only the main process (global rank 0, the one that writes checkpoints and
  metrics) takes it, and every process learns whether it got it, so all stop together.

Where fcntl does not exist (Windows) the folder is not locked, with a warning.
"""

import datetime
import json
import logging
import os
import socket
import sys

from detectron2.utils import comm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["OutputDirInUseError", "lock_output_dir", "lock_output_dir_on_main_process", "LOCK_NAME"]

LOCK_NAME = ".acm_d2_run.lock"
_held = {}  # real path of a locked folder -> the open descriptor that holds its lock

logger = logging.getLogger(__name__)


class OutputDirInUseError(RuntimeError):
    """Another running process holds the OUTPUT_DIR lock; the message names it."""


def lock_output_dir(output_dir: str) -> bool:
    """Take the exclusive run lock of `output_dir` (created if missing) for the rest of this process.

    Returns False where nothing was locked (a remote `scheme://` folder, no fcntl), True otherwise; a
    second call for a folder this process holds is a no-op. Raises OutputDirInUseError naming the
    process that holds it.
    """
    if not output_dir or "://" in output_dir:
        return False
    if fcntl is None:
        logger.warning(
            f"OUTPUT_DIR {output_dir} is not locked (no fcntl on this system): run one job per folder"
        )
        return False
    folder = os.path.realpath(output_dir)
    if folder in _held:
        return True
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode("utf-8", "replace")
        os.close(fd)
        raise OutputDirInUseError(
            f"OUTPUT_DIR {output_dir} is in use by another run ({_describe(holder)}); two runs in one folder would "
            "interleave their checkpoints and metrics. Wait for that run to end or stop it, or give this one "
            f"another OUTPUT_DIR. (Lock file: {path}; the lock ends with its process, even a killed one.)"
        ) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[folder] = fd
    return True


def _describe(holder: str) -> str:
    try:
        r = json.loads(holder)
        return f"pid {r['pid']} on {r['host']}, started {r['started']}: {r['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def lock_output_dir_on_main_process(output_dir: str) -> None:
    """lock_output_dir in the main process; in a multi-process run every process then raises the main
    process's OutputDirInUseError, if any, instead of waiting for it at the first collective."""
    error = None
    if comm.is_main_process():
        try:
            lock_output_dir(output_dir)
        except OutputDirInUseError as e:
            error = str(e)
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]
    if error:
        raise OutputDirInUseError(error)
