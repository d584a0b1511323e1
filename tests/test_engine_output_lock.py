"""One OUTPUT_DIR, one run (acm_d2/engine/output_lock.py): a second run is refused with the holder's
details, before it writes anything; a crashed holder leaves no stale lock."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from acm_d2.engine import OutputDirInUseError, OutputDirLockError, Trainer, lock_output_dir
from acm_d2.engine.output_lock import LOCK_NAME, NO_LOCK_ENV
from conftest import CONFIG, SMALL, TRAIN_NET, trainer_cfg

HOLD = "import sys, time; from acm_d2.engine import lock_output_dir; lock_output_dir(sys.argv[1]); print('LOCKED', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "LOCKED"
    yield out, proc
    proc.kill()
    proc.wait()


def test_second_run_is_refused_naming_the_holder_and_a_crashed_holder_leaves_no_lock(
    holder, tiny_dataset
):
    out, proc = holder
    message = rf"OUTPUT_DIR .*out is in use by another run \(pid {proc.pid} on {socket.gethostname()}, started .*: .*-c"
    with pytest.raises(OutputDirInUseError, match=message):
        lock_output_dir(str(out))
    with pytest.raises(
        OutputDirInUseError, match=message
    ):  # the Trainer takes it too (programmatic use)
        Trainer(trainer_cfg(tiny_dataset, out))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_output_dir(str(out)) and lock_output_dir(
        str(out)
    )  # free after the crash; a no-op when held
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_train_net_on_a_folder_in_use_stops_before_writing_there(holder, tiny_dataset):
    out, proc = holder
    datasets = [
        a
        for split, (j, r) in tiny_dataset.items()
        for a in ("--coco-dataset", f"tiny_{split}", j, r)
    ]
    cmd = [
        sys.executable,
        TRAIN_NET,
        "--config-file",
        CONFIG,
        *datasets,
        "--resume",
        *SMALL,
        "OUTPUT_DIR",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"in use by another run (pid {proc.pid}" in result.stderr, (
        result.stderr[-3000:]
    )
    assert sorted(os.listdir(out)) == [
        LOCK_NAME
    ]  # no config.yaml, log.txt or metrics of the refused run


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    symlinked, hardlinked = tmp_path / "a", tmp_path / "b"
    symlinked.mkdir()
    hardlinked.mkdir()
    (symlinked / LOCK_NAME).symlink_to(victim)
    (hardlinked / LOCK_NAME).hardlink_to(victim)
    for out, kind in ((symlinked, "a symbolic link"), (hardlinked, "a hard link")):
        with pytest.raises(OutputDirLockError, match=rf"{LOCK_NAME} is {kind}.*rm .*{LOCK_NAME}"):
            lock_output_dir(str(out))
    assert victim.read_text() == "precious"
    (tmp_path / "c").mkdir()
    os.mkfifo(tmp_path / "c" / LOCK_NAME)
    with pytest.raises(OutputDirLockError, match="is not a regular file"):
        lock_output_dir(str(tmp_path / "c"))


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_filesystem_without_locks_is_not_reported_as_a_folder_in_use(tmp_path, monkeypatch, code):
    def flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.delenv(NO_LOCK_ENV, raising=False)
    with pytest.raises(OutputDirLockError, match="does not support file locks") as refused:
        lock_output_dir(str(tmp_path / "nfs"))
    assert not isinstance(refused.value, OutputDirInUseError)
    assert "local disk" in str(refused.value) and f"{NO_LOCK_ENV}=1" in str(refused.value)
    monkeypatch.setenv(NO_LOCK_ENV, "1")  # the explicit opt-out runs unlocked
    assert lock_output_dir(str(tmp_path / "nfs")) is False
