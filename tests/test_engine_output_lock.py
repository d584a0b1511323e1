"""One OUTPUT_DIR, one run (acm_d2/engine/output_lock.py): a second run is refused with the holder's
details, before it writes anything; a crashed holder leaves no stale lock."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from acm_d2.engine import OutputDirInUseError, Trainer, lock_output_dir
from acm_d2.engine.output_lock import LOCK_NAME
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
