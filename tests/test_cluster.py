"""tools/train_net.py on clusters: started by torchrun (elastic restarts included), by srun (SLURM's
variables set by hand), stopped by a preemption signal and requeued, submitted with submitit; and the
mistakes that must fail with a clear message. On the CPU (gloo), 2 processes of the tiny config."""

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from acm_d2.engine import (
    PREEMPTED_EXIT_CODE,
    ClusterLaunchError,
    argument_parser,
    launch_from_args,
)
from conftest import CONFIG, REPO, child_pids, free_port, train_net_command

MAX_ITER = 4
SHORT = ["SOLVER.MAX_ITER", str(MAX_ITER), "DATASETS.TEST", "()"]
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_RESTART_COUNT",
    "SUBMITIT_EXECUTOR",
)


def clean_env(**extra):
    """This environment without any launcher's variables (pytest itself may run under SLURM), plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    return dict(env, **extra)


def start(cmd, pipe=False, **env):
    """cmd in its own process group (so that a test that fails can stop all of it), its output in a
    file; `pipe`: in proc.stdout, which the caller must then read as it comes (a full pipe blocks)."""
    output = subprocess.PIPE if pipe else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        cmd,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(**env),
        start_new_session=True,
    )
    proc.output = None if pipe else output
    return proc


def finish(proc, expected=0, timeout=300):
    """Wait for proc; it must exit with `expected`. Its output (what was not read from a pipe yet)."""
    try:
        log = proc.communicate(timeout=timeout)[0] or ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0] or ""
        failure = f"still running after {timeout} s"
    else:
        failure = None
    if proc.output is not None:
        proc.output.seek(0)
        log = proc.output.read()
        proc.output.close()
    if failure:
        pytest.fail(f"{failure}:\n{log[-8000:]}")
    assert proc.returncode == expected, log[-5000:]
    return log


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def two_gpus_reference(tiny_dataset, tmp_path_factory):
    """model_final.pth of `--num-gpus 2` (Detectron2's launch), MAX_ITER iterations."""
    out = tmp_path_factory.mktemp("num_gpus_2")
    cmd = train_net_command(tiny_dataset, out, "--num-gpus", "2", opts=SHORT)
    finish(start(cmd))
    return out / "model_final.pth"


def test_torchrun_with_two_processes_equals_num_gpus_2(tiny_dataset, tmp_path, two_gpus_reference):
    cmd = train_net_command(tiny_dataset, tmp_path, opts=SHORT)
    log = finish(start(torchrun("--standalone", "--nproc_per_node", "2", *cmd[1:])))
    assert "Ranks hold identical weights after training (2 processes compared)" in log
    assert_same_weights(tmp_path / "model_final.pth", two_gpus_reference)


def test_killed_worker_under_max_restarts_resumes_bit_identically(
    tiny_dataset, tmp_path, two_gpus_reference
):
    # No --resume: the restarted workers resume by themselves (TORCHELASTIC_RESTART_COUNT).
    cmd = train_net_command(tiny_dataset, tmp_path, opts=[*SHORT, "SOLVER.CHECKPOINT_PERIOD", "1"])
    proc = start(torchrun("--standalone", "--nproc_per_node", "2", "--max-restarts", "1", *cmd[1:]))
    deadline = time.time() + 300
    while not (tmp_path / "model_0000000.pth").exists() and proc.poll() is None:
        assert time.time() < deadline, finish(proc, timeout=1)
        time.sleep(0.02)
    workers = child_pids(proc.pid)
    assert len(workers) == 2, finish(proc)
    os.kill(max(workers), signal.SIGKILL)
    log = finish(proc)
    assert "resuming from the last checkpoint of OUTPUT_DIR" in log
    resumed_at = [
        int(line.rsplit(" ", 1)[1])
        for line in log.splitlines()
        if "Starting training from iteration" in line
    ]
    assert resumed_at[0] == 0 and max(resumed_at) >= 1, (
        resumed_at
    )  # trained again from a checkpoint
    assert_same_weights(tmp_path / "model_final.pth", two_gpus_reference)


def test_two_processes_with_slurm_variables_train_together(
    tiny_dataset, tmp_path, two_gpus_reference
):
    cmd = train_net_command(tiny_dataset, tmp_path, opts=SHORT)
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_STEP_ID="0",
        SLURM_NTASKS="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="localhost",
        MASTER_PORT=str(free_port()),  # else one derived from the job id, possibly in use here
    )
    procs = [start(cmd, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm) for r in (0, 1)]
    logs = [finish(p) for p in procs]
    assert "Ranks hold identical weights after training (2 processes compared)" in logs[0]
    assert_same_weights(tmp_path / "model_final.pth", two_gpus_reference)


# train_net with torch.save slowed down at its first call: it writes half of the bytes, says so, waits
# 3 s (a signal's handler runs meanwhile) and writes the rest.
SLOW_SAVING_TRAIN_NET = """
import io, runpy, sys, time
import torch
_save, _calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] != 1:
        return _save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    _save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    print("IN-SAVE", flush=True)
    end = time.time() + 3
    while time.time() < end:
        time.sleep(0.1)
    f.write(data[len(data) // 2 :])
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/scontrol.calls"
"""


def fake_commands(folder, **scripts):
    """Executables named after the keys, in `folder`; returns a PATH that finds them first."""
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_preemption_signal_checkpoints_exits_for_requeue_and_resumes_exactly(
    tiny_dataset, tmp_path
):
    wrapper = tmp_path / "slow_saving_train_net.py"
    wrapper.write_text(SLOW_SAVING_TRAIN_NET)
    bin_dir = tmp_path / "bin"
    path = fake_commands(bin_dir, scontrol=FAKE_SCONTROL)
    out = tmp_path / "preempted"
    many = ["SOLVER.MAX_ITER", "1000", "DATASETS.TEST", "()"]
    cmd = train_net_command(tiny_dataset, out, opts=many, wrapper=str(wrapper))
    proc = start(
        cmd, pipe=True, SLURM_JOB_ID="4242", PATH=path
    )  # a one-task SLURM job: its batch script
    log = []
    for line in proc.stdout:
        log.append(line)
        if "checkpoint at the next iteration boundary" in line:  # the handlers are installed
            proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit (--signal)
        if "IN-SAVE" in line:
            proc.send_signal(signal.SIGTERM)  # a second signal in the middle of the save
            break
    log = "".join(log) + finish(proc, PREEMPTED_EXIT_CODE)
    assert "SIGTERM received while writing the preemption checkpoint: ignored" in log
    stopped = int((out / "last_checkpoint").read_text()[len("model_") : -len(".pth")])
    assert f"SIGUSR1: stopping after iteration {stopped}" in log
    assert (bin_dir / "scontrol.calls").read_text() == "requeue 4242\n"
    assert not list(out.glob(".*.tmp"))
    torch.load(out / f"model_{stopped:07d}.pth", weights_only=True)  # complete

    # The requeued job (SLURM_RESTART_COUNT 1, no --resume) continues exactly where it stopped.
    end = ["SOLVER.MAX_ITER", str(stopped + 3), "DATASETS.TEST", "()"]
    log = finish(start(train_net_command(tiny_dataset, out, opts=end), SLURM_RESTART_COUNT="1"))
    assert f"Starting training from iteration {stopped + 1}" in log
    reference = tmp_path / "uninterrupted"
    finish(start(train_net_command(tiny_dataset, reference, opts=end)))
    assert_same_weights(out / "model_final.pth", reference / "model_final.pth")


def wait_for(text, log_file, proc, timeout=120):
    """Until log_file (a rank > 0 logs only to its file) holds text; proc must stay alive meanwhile."""
    deadline = time.time() + timeout
    while not (log_file.exists() and text in log_file.read_text()):
        assert time.time() < deadline and proc.poll() is None, finish(proc, timeout=1)
        time.sleep(0.05)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_iteration(tiny_dataset, tmp_path):
    bin_dir = tmp_path / "bin"
    path = fake_commands(bin_dir, scontrol=FAKE_SCONTROL)
    out = tmp_path / "out"
    cmd = train_net_command(
        tiny_dataset, out, opts=["SOLVER.MAX_ITER", "1000", "DATASETS.TEST", "()"]
    )
    slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1")
    slurm.update(SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    procs = [
        start(cmd, pipe=r == 0, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), PATH=path, **slurm)
        for r in (0, 1)
    ]
    ready = "checkpoint at the next iteration boundary"  # the handlers are installed
    for line in procs[0].stdout:
        if ready in line:
            break
    rank1_log = out / "log.txt.rank1"  # rank 1 logs only to its file
    wait_for(ready, rank1_log, procs[1])
    procs[1].send_signal(signal.SIGUSR1)  # rank 1 only
    log0 = finish(procs[0], PREEMPTED_EXIT_CODE)
    finish(procs[1], PREEMPTED_EXIT_CODE)
    stopped = (out / "last_checkpoint").read_text()[len("model_") : -len(".pth")]
    message = f"SIGUSR1: stopping after iteration {int(stopped)}, writing model_{stopped}.pth"
    assert message in log0 and message in rank1_log.read_text()
    assert (bin_dir / "scontrol.calls").read_text() == "requeue 4242\n"  # by rank 0 alone


def test_sigusr1_to_the_launcher_of_num_gpus_2_checkpoints_and_exits_for_requeue(
    tiny_dataset, tmp_path
):
    path = fake_commands(tmp_path / "bin", scontrol=FAKE_SCONTROL)
    out = tmp_path / "out"
    many = ["SOLVER.MAX_ITER", "1000", "DATASETS.TEST", "()"]
    cmd = train_net_command(tiny_dataset, out, "--num-gpus", "2", opts=many)
    proc = start(cmd, pipe=True, SLURM_JOB_ID="4242", PATH=path)  # one task: the batch script
    for line in proc.stdout:
        if "checkpoint at the next iteration boundary" in line:  # rank 0's handlers are installed
            break
    wait_for("checkpoint at the next iteration boundary", out / "log.txt.rank1", proc)
    proc.send_signal(signal.SIGUSR1)  # the launcher alone, which passes it on
    log = finish(proc, PREEMPTED_EXIT_CODE)
    last = (out / "last_checkpoint").read_text()
    assert f"writing {last}" in log
    torch.load(out / last, weights_only=True)  # complete
    assert (tmp_path / "bin" / "scontrol.calls").read_text() == "requeue 4242\n"


FAKE_SBATCH = """#!/bin/sh
for last; do :; done
cp "$last" "$(dirname "$0")/submitted.sh"
echo "Submitted batch job 4242"
"""


def test_submit_slurm_builds_a_multi_node_submitit_job(tmp_path):
    path = fake_commands(tmp_path / "bin", sbatch=FAKE_SBATCH, srun="#!/bin/sh\n")
    out = tmp_path / "out"
    submit = os.path.join(REPO, "tools", "submit_slurm.py")
    cmd = [sys.executable, submit, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu"]
    cmd += ["--time", "90", "--config-file", CONFIG, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "7"]
    log = finish(start(cmd, PATH=path))
    assert "Submitted job 4242: 2 node(s) x 4 task(s)" in log
    script = (tmp_path / "bin" / "submitted.sh").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, script
    assert f"{out}/submitit/" in script and "srun" in script
    # The job itself: train_net's arguments, and what submitit resubmits when it requeues.
    import submitit

    pickles = list((out / "submitit").glob("*/*_submitted.pkl"))
    assert len(pickles) == 1
    job = submitit.helpers.DelayedSubmission.load(pickles[0]).function
    assert job.argv == ["--config-file", CONFIG, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "7"]
    assert job.checkpoint().function.argv == ["--resume", *job.argv]


def test_submit_slurm_job_trains_on_submitits_local_executor(
    tiny_dataset, tmp_path, two_gpus_reference
):
    submit = os.path.join(REPO, "tools", "submit_slurm.py")
    cmd = train_net_command(tiny_dataset, tmp_path, opts=SHORT)
    finish(start([sys.executable, submit, "--cluster", "local", "--gpus-per-node", "2", *cmd[2:]]))
    # Two tasks on this machine, joined by submitit's environment: the result of --num-gpus 2.
    assert_same_weights(tmp_path / "model_final.pth", two_gpus_reference)


# ---- mistakes ---------------------------------------------------------------------------------------
def parse(*argv):
    return argument_parser().parse_args(["--config-file", CONFIG, *argv])


def never_called(args):
    raise AssertionError("main ran")


def set_env(monkeypatch, **variables):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


TORCHRUN_2 = dict(
    RANK="0",
    WORLD_SIZE="2",
    LOCAL_RANK="0",
    LOCAL_WORLD_SIZE="2",
    MASTER_ADDR="127.0.0.1",
    MASTER_PORT="29500",
    TORCHELASTIC_RUN_ID="x",
)


def test_num_gpus_under_torchrun_is_an_error(monkeypatch):
    set_env(monkeypatch, **TORCHRUN_2)
    with pytest.raises(
        ClusterLaunchError,
        match=r"--num-gpus given, but this process was started by torchrun.*--nproc_per_node",
    ):
        launch_from_args(never_called, parse("--num-gpus", "2"))


def test_world_size_that_does_not_fit_the_nodes_or_gpus_is_an_error(monkeypatch):
    set_env(monkeypatch, **dict(TORCHRUN_2, WORLD_SIZE="3"))
    with pytest.raises(ClusterLaunchError, match="WORLD_SIZE 3.*LOCAL_WORLD_SIZE 2"):
        launch_from_args(never_called, parse())
    set_env(monkeypatch, **dict(TORCHRUN_2, WORLD_SIZE="8", LOCAL_WORLD_SIZE="8"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ClusterLaunchError, match="8 processes run on this node .* 4 visible GPUs"):
        launch_from_args(never_called, parse())
    set_env(monkeypatch)
    with pytest.raises(
        ClusterLaunchError, match="--num-gpus 8 but this machine has 4 visible GPUs"
    ):
        launch_from_args(never_called, parse("--num-gpus", "8"))


def test_unreachable_rendezvous_times_out_naming_host_and_port(monkeypatch):
    port = free_port()  # closed: nothing listens there
    set_env(monkeypatch, **dict(TORCHRUN_2, RANK="1", LOCAL_RANK="1", MASTER_PORT=str(port)))
    begin = time.time()
    with pytest.raises(
        ClusterLaunchError,
        match=f"rank 1 of 2 could not reach the rendezvous at 127.0.0.1:{port}",
    ):
        launch_from_args(never_called, parse("--rendezvous-timeout", "1"))
    assert time.time() - begin < 30
