"""Reading checkpoints never runs code from them (acm_d2/checkpoint/safe_load.py), for every reader: the
checkpointer (train_net, --eval-only, the attention tool) and the converters; files are written with the
user's permissions; converters never overwrite their input."""

import argparse
import os
import pickle
import re
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from acm_d2.checkpoint.checkpointer import AtomicCheckpointer
from acm_d2.checkpoint.read import read_state_dict
from acm_d2.checkpoint.safe_load import (
    TRUST_ENV,
    CheckpointError,
    UntrustedCheckpointError,
    load_checkpoint,
)
from acm_d2.utils.files import atomic_write
from conftest import REPO

CONVERTERS = [
    os.path.join(REPO, "tools", t)
    for t in ("convert_official_acm.py", "convert_torchvision_weights.py")
]


class RunsCode:
    """Unpickling this object calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(tmp_path):
    """A .pkl and a .pth whose unpickling would create tmp_path/pwned."""
    marker = tmp_path / "pwned"
    pkl, pth = tmp_path / "evil.pkl", tmp_path / "evil.pth"
    payload = {"model": {"w": np.zeros(2, np.float32)}, "__author__": "x", "x": RunsCode(marker)}
    pkl.write_bytes(pickle.dumps(payload, protocol=2))
    torch.save({"model": {"w": torch.zeros(2)}, "x": RunsCode(marker)}, pth)
    return marker, [pkl, pth]


@pytest.fixture
def model():
    return torch.nn.Sequential(torch.nn.Linear(2, 2))


def test_checkpointer_refuses_code_in_pkl_and_pth_naming_file_and_class(
    tmp_path, model, monkeypatch
):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker, files = malicious_files(tmp_path)
    for path in files:
        with pytest.raises(
            UntrustedCheckpointError, match=rf"{path.name}.*(posix|os)\.system.*{TRUST_ENV}=1"
        ):
            AtomicCheckpointer(model).load(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("tool", CONVERTERS)
def test_converters_refuse_code_in_their_input(tmp_path, tool):
    marker, files = malicious_files(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != TRUST_ENV}
    for path in files:
        result = subprocess.run(
            [sys.executable, tool, str(path), str(tmp_path / "out.pkl")],
            capture_output=True,
            text=True,
            env=env,
        )
        assert result.returncode != 0 and "refusing to read checkpoint" in result.stderr, (
            result.stderr[-2000:]
        )
        assert path.name in result.stderr and "system" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_opt_in_reads_a_trusted_file(tmp_path, monkeypatch):
    """A checkpoint holding another object (here an argparse.Namespace) is refused, and read after opting in."""
    path = tmp_path / "mine.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UntrustedCheckpointError, match=r"mine\.pth.*argparse\.Namespace"):
        load_checkpoint(str(path))
    assert load_checkpoint(str(path), trusted=True)["args"].lr == 0.1
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_state_dict(str(path))["w"].sum() == 2


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pkl_of_numpy_arrays_still_loads(tmp_path, model, protocol):
    """Detectron2 model-zoo .pkl files (Detectron2 format and Caffe2 "blobs" format): numpy arrays,
    scalars and an OrderedDict, at the pickle protocols Python 2 and 3 write."""
    import collections

    weight = np.arange(4, dtype=np.float32).reshape(2, 2)
    d2 = {
        "model": collections.OrderedDict(
            {"0.weight": weight, "0.bias": np.array([1, 2], np.float32)}
        ),
        "__author__": "Detectron2 Model Zoo",
        "scale": np.float32(2.0),
    }
    (tmp_path / "d2.pkl").write_bytes(pickle.dumps(d2, protocol=protocol))
    AtomicCheckpointer(model).load(str(tmp_path / "d2.pkl"))
    assert torch.equal(model[0].weight, torch.from_numpy(weight)) and model[0].bias.tolist() == [
        1,
        2,
    ]
    caffe2 = {
        "blobs": {
            "0.weight": -weight,
            "0.bias": np.zeros(2, np.float32),
            "0.weight_momentum": weight,
        }
    }
    (tmp_path / "c2.pkl").write_bytes(pickle.dumps(caffe2, protocol=protocol))
    assert read_state_dict(str(tmp_path / "c2.pkl"))["blobs"]["0.weight"][0, 1] == -1


def test_trainer_checkpoint_needs_nothing_but_weights(tiny_dataset, tmp_path):
    """model_*.pth written by the trainer (model, optimizer, scheduler, iteration, trainer/hook state with
    the metric history, AMP grad scaler) is read with weights_only=True and no allow-listed class."""
    from acm_d2.engine import Trainer
    from conftest import train, trainer_cfg

    train(trainer_cfg(tiny_dataset, tmp_path, "SOLVER.MAX_ITER", 1, "DATASETS.TEST", ()))
    data = load_checkpoint(str(tmp_path / "model_final.pth"), trusted=False)
    assert (
        set(data) == {"model", "trainer", "iteration"}
        and "optimizer" in data["trainer"]["_trainer"]
    )
    assert set(data["trainer"]["hooks"]) == {"ExactResumeHook", "LRScheduler"}
    assert data["trainer"]["hooks"]["ExactResumeHook"]["history"]["loss_cls"]["values"]
    # AMPTrainer needs CUDA to step: save the state of one with a CPU grad scaler.
    amp = Trainer(trainer_cfg(tiny_dataset, tmp_path / "amp", "SOLVER.AMP.ENABLED", True))
    amp._trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    amp.checkpointer.save("model_amp")
    assert (
        load_checkpoint(str(tmp_path / "amp" / "model_amp.pth"), trusted=False)["trainer"][
            "_trainer"
        ]["grad_scaler"]["scale"]
        == 8.0
    )


def test_atomic_write_uses_the_umask_not_0600(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "a.json"), lambda f: f.write("{}"), "w")
        os.umask(0o002)
        atomic_write(str(tmp_path / "b.pth"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "b.pth").st_mode) == 0o664


@pytest.mark.parametrize("tool", CONVERTERS)
def test_converters_never_overwrite_their_input_and_name_a_missing_output_folder(tmp_path, tool):
    source = tmp_path / "in.pkl"
    source.write_bytes(
        pickle.dumps({"model": {"conv1.weight": np.zeros((1, 3, 1, 1), np.float32)}})
    )
    (tmp_path / "hard.pkl").hardlink_to(source)
    (tmp_path / "soft.pkl").symlink_to(source)
    before = source.read_bytes()
    for output in (source, tmp_path / "hard.pkl", tmp_path / "soft.pkl", tmp_path / "." / "in.pkl"):
        result = subprocess.run(
            [sys.executable, tool, str(source), str(output)], capture_output=True, text=True
        )
        assert result.returncode != 0 and "is the input file" in result.stderr, (
            output,
            result.stderr[-2000:],
        )
    assert source.read_bytes() == before
    result = subprocess.run(
        [sys.executable, tool, str(source), str(tmp_path / "nope" / "out.pkl")],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode != 0
        and f"output folder {str(tmp_path / 'nope')!r} does not exist" in result.stderr
    ), result.stderr


def _deep_list_pickle(depth):
    """A protocol-2 pickle of {"model": [[[...]]]}, `depth` lists deep, written opcode by opcode (pickle
    itself would recurse)."""
    model = b"X\x05\x00\x00\x00model"
    return b"\x80\x02}" + model + b"]" * depth + b"a" * (depth - 1) + b"s."


def _nested_object_arrays_pickle(depth):
    """numpy object arrays, each holding the next: freeing these recursively crashed the process."""
    one = pickle.dumps(np.array([7], dtype=object), protocol=2)
    head, tail = one[2:].split(b"K\x07")  # drop PROTO; BININT1 7 is the innermost element
    return b"\x80\x02" + head * depth + b"K\x07" + tail[:-1] * depth + b"."


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("deep.pkl", _deep_list_pickle(50_000), r"nests containers more than 100 deep"),
        ("one_object.pkl", pickle.dumps({"model": {"w": np.array([1, "a"], object)}}), "dtype"),
        (
            "big_array.pkl",  # numpy.ndarray((2**24,)) called from the pickle
            b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x01\x85R.",
            r"built other than numpy pickles one",
        ),
    ],
)
def test_hostile_pkl_is_refused_naming_the_file(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*{message}"):
        load_checkpoint(str(path), trusted=False)


def test_nested_object_arrays_are_refused_instead_of_crashing_the_process(tmp_path):
    """Run in a subprocess: before the fix, freeing the arrays killed the interpreter (SIGSEGV)."""
    path = tmp_path / "objects.pkl"
    path.write_bytes(_nested_object_arrays_pickle(50_000))
    code = (
        "import sys; from acm_d2.checkpoint.safe_load import CheckpointError, load_checkpoint\n"
        "try: load_checkpoint(sys.argv[1], trusted=False)\n"
        "except CheckpointError as e: print(e); sys.exit(3)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
    assert "objects.pkl" in result.stdout and "dtype object" in result.stdout, result.stdout


def test_checkpoints_nested_a_few_dozen_deep_still_load(tmp_path):
    for name, weight in (("ok.pkl", np.zeros(2, np.float32)), ("ok.pth", torch.zeros(2))):
        nested = {"model": {"w": weight}, "history": [[[1.0]] * 3] * 2}
        for _ in range(20):
            nested = {"trainer": nested}
        if name.endswith(".pkl"):
            (tmp_path / name).write_bytes(pickle.dumps(nested))
        else:
            torch.save(nested, tmp_path / name)
        assert load_checkpoint(str(tmp_path / name), trusted=False).keys() == {"trainer"}


def test_nesting_through_a_shared_container_counts_its_whole_depth(tmp_path):
    """60 lists reached shallow first and again under 60 more: 120 deep, each path alone is not."""
    chain = []
    for _ in range(60):
        chain = [chain]
    deep = chain
    for _ in range(60):
        deep = [deep]
    path = tmp_path / "shared.pkl"
    path.write_bytes(pickle.dumps({"model": {"deep": deep, "shallow": chain}}))
    with pytest.raises(CheckpointError, match=r"shared\.pkl.*more than 100 deep"):
        load_checkpoint(str(path), trusted=False)
    loop = []
    loop.append(loop)
    path.write_bytes(pickle.dumps({"model": loop}))
    with pytest.raises(CheckpointError, match="holds itself"):
        load_checkpoint(str(path), trusted=False)


def test_a_pth_record_inflating_far_beyond_its_size_is_refused_before_allocating(tmp_path):
    """A 256 MiB storage of zeros deflated to ~0.3 MB: refused from the zip directory, before
    torch.load allocates it (the process's peak memory does not grow by the declared size)."""
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(64 * 2**20)}}, plain)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for record in src.infolist():
            dst.writestr(record.filename, src.read(record))
    plain.unlink()
    assert bomb.stat().st_size < 2**20
    code = (
        "import re, sys; from acm_d2.checkpoint.safe_load import CheckpointError, load_checkpoint\n"
        # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's before exec)
        "peak = lambda: int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "before = peak()\n"
        "try: load_checkpoint(sys.argv[1], trusted=False)\n"
        "except CheckpointError as e: print(e)\n"
        "print('grew', peak() - before)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"bomb\.pth.*declares 268435456 bytes", result.stdout), result.stdout
    grew = int(result.stdout.split("grew ")[1])
    assert grew < 2**26, grew  # reading the record would take 256 MiB
