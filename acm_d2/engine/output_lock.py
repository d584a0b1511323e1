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
  metrics) takes it, and every process learns whether it got it, so all stop together;
* the lock file is opened without following a symbolic link and must be a regular file with one name:
  a link planted in a shared folder would otherwise make the run overwrite the file it points to.

Where fcntl does not exist (Windows) the folder is not locked, with a warning. A filesystem without
file locks (some NFS mounts) is an OutputDirLockError that says so; ACM_D2_NO_OUTPUT_LOCK=1 runs
without the lock there, for a user who makes sure of one run per folder.
"""

import datetime
import errno
import json
import logging
import os
import socket
import stat
import sys

from detectron2.utils import comm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "OutputDirLockError",
    "OutputDirInUseError",
    "lock_output_dir",
    "lock_output_dir_on_main_process",
    "LOCK_NAME",
    "NO_LOCK_ENV",
]

LOCK_NAME = ".acm_d2_run.lock"
NO_LOCK_ENV = "ACM_D2_NO_OUTPUT_LOCK"
# flock's answers when the filesystem cannot lock at all (NFS without a lock manager, some FUSE
# mounts), as opposed to EWOULDBLOCK: another process holds the lock.
_NO_LOCK_SUPPORT = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held = {}  # real path of a locked folder -> the open descriptor that holds its lock

logger = logging.getLogger(__name__)


class OutputDirLockError(RuntimeError):
    """OUTPUT_DIR cannot be locked for this run; the message names the file and what to do."""


class OutputDirInUseError(OutputDirLockError):
    """Another running process holds the OUTPUT_DIR lock; the message names it."""


def lock_output_dir(output_dir: str) -> bool:
    """Take the exclusive run lock of `output_dir` (created if missing) for the rest of this process.

    Returns False where nothing was locked (a remote `scheme://` folder, no fcntl, a filesystem without
    locks and ACM_D2_NO_OUTPUT_LOCK=1), True otherwise; a second call for a folder this process holds
    is a no-op. Raises OutputDirInUseError naming the process that holds it, OutputDirLockError for a
    lock file that is a link or not a regular file, or a filesystem without locks.
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
    fd = _open_lock_file(path, output_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in _NO_LOCK_SUPPORT:
            os.close(fd)
            if _no_lock_wanted():
                logger.warning(
                    f"OUTPUT_DIR {output_dir} is not locked ({NO_LOCK_ENV}=1; its filesystem has no "
                    f"file locks: {error.strerror}): run one job per folder"
                )
                return False
            raise OutputDirLockError(
                f"OUTPUT_DIR {output_dir} cannot be locked: its filesystem does not support file "
                f"locks (flock on {path}: {error.strerror}; some NFS mounts), so this run cannot make "
                "sure that no other run writes there. Use an OUTPUT_DIR on a local disk (and copy the "
                f"results over afterwards), or set {NO_LOCK_ENV}=1 to run without the lock if you "
                "make sure yourself that one run uses this folder."
            ) from None
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
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


def _open_lock_file(path: str, output_dir: str) -> int:
    """A descriptor of the lock file `path` (created if missing), refusing anything but a regular file
    with one name: O_NOFOLLOW stops at a symbolic link, and a hard link or a device would make the
    record written below land in another file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise OutputDirLockError(_not_a_lock_file(path, output_dir, "a symbolic link")) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "a hard link" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise OutputDirLockError(_not_a_lock_file(path, output_dir, kind))
    return fd


def _not_a_lock_file(path: str, output_dir: str, kind: str) -> str:
    return (
        f"OUTPUT_DIR {output_dir}: its lock file {path} is {kind}; a run writes its details into the "
        "lock file, which would overwrite whatever that points to, so it is refused. Nothing of ours "
        f"makes one: remove it (rm {path}) and start again, and check who can write into that folder."
    )


def _no_lock_wanted() -> bool:
    return os.environ.get(NO_LOCK_ENV, "").strip().lower() in ("1", "true", "yes")


def _describe(holder: str) -> str:
    try:
        r = json.loads(holder)
        return f"pid {r['pid']} on {r['host']}, started {r['started']}: {r['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def lock_output_dir_on_main_process(output_dir: str) -> None:
    """lock_output_dir in the main process; in a multi-process run every process then raises the main
    process's OutputDirLockError, if any, instead of waiting for it at the first collective."""
    error = None
    if comm.is_main_process():
        try:
            lock_output_dir(output_dir)
        except OutputDirLockError as e:
            error = e
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]
    if error:
        raise error
