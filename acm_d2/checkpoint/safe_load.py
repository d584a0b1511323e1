"""Reading a checkpoint file without running code from it.

A checkpoint is a pickle, and unpickling can call any function the file names: a `.pkl` or `.pth`
downloaded from the internet (the converters' usual input) or copied from a shared folder must not be
able to run code. Every acm_d2 reader (AtomicCheckpointer, hence train_net, --eval-only and the attention
tool; the converters) goes through `load_checkpoint`:

* `.pkl` (Detectron2's model zoo, Caffe2/Detectron1 weights, tools/convert_torchvision_weights.py's
  output): a pickle of dicts of numpy arrays. Read by an unpickler that builds only dicts, lists, numbers,
  strings and numpy arrays / scalars (`SAFE_PICKLE_GLOBALS`).
* anything else (`.pth`, `.pyth`): `torch.load(weights_only=True)`, which builds only tensors, containers
  and plain values. acm_d2's own checkpoints (model, optimizer, LR scheduler, iteration, the trainer's
  hooks and AMP grad scaler) hold nothing else, so they need no allow-listing; a class registered with
  `torch.serialization.add_safe_globals` is accepted as well.

Anything else is an UntrustedCheckpointError naming the file and the class it wanted. For a file you
trust (e.g. one you wrote yourself with other objects in it), opt in with the environment variable
ACM_D2_TRUST_CHECKPOINTS=1 or the tools' --trust-checkpoint flag: it is then read with the plain
(code-running) pickle / torch.load(weights_only=False).
"""

import io
import os
import pickle
import re

import torch

__all__ = [
    "CheckpointError",
    "UntrustedCheckpointError",
    "load_checkpoint",
    "checkpoints_trusted",
    "TRUST_ENV",
    "TRUST_FLAG_HELP",
    "SAFE_PICKLE_GLOBALS",
]

TRUST_ENV = "ACM_D2_TRUST_CHECKPOINTS"
HOW_TO_TRUST = f"if you trust this file, set the environment variable {TRUST_ENV}=1 (or pass --trust-checkpoint)"
TRUST_FLAG_HELP = (
    "read checkpoints with the plain unpickler, which can run code from them: only for files you trust "
    f"(same as {TRUST_ENV}=1; by default only weights are read, see acm_d2/checkpoint/safe_load.py)"
)

# What pickles of numpy arrays name: the array and dtype constructors (numpy 1 "numpy.core", numpy 2
# "numpy._core"), numpy scalars, protocol-5 buffers, OrderedDict, and how Python 3 pickles bytes at
# protocol 2.
SAFE_PICKLE_GLOBALS = frozenset(
    [
        (f"{core}.multiarray", name)
        for core in ("numpy.core", "numpy._core")
        for name in ("_reconstruct", "scalar")
    ]
    + [(f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")]
    + [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    ]
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that would run code or build objects other than weights when read."""


def checkpoints_trusted() -> bool:
    """Whether the user opted in to reading checkpoints with the plain, code-running unpickler."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _refuse(path, wanted):
    raise UntrustedCheckpointError(
        f"refusing to read checkpoint {path!r}: it asks for {wanted}, which a file of weights does not need "
        f"and which could run code; {HOW_TO_TRUST}"
    )


def _load_pkl(path, trusted):
    with open(path, "rb") as f:
        data = f.read()
    if trusted:
        return pickle.loads(data, encoding="latin1")
    try:
        return _WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        if re.fullmatch(r"[\w.]+\.\w+", str(error)):  # raised by find_class: the name of the global
            _refuse(path, f"the Python object {str(error)!r}")
        raise


def _load_torch(path, trusted):
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch >= 2.5 lists every unsafe global; older versions name the first one in the message. A
        # file that is not a pickle at all fails the same way but names no global: re-raised as it is.
        wanted = re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]
        lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if wanted and lister is not None:
            wanted = lister(path) or wanted
        if not wanted:
            raise
        _refuse(path, f"the Python object(s) {', '.join(map(repr, wanted))}")


def load_checkpoint(path: str, trusted=None):
    """The object saved in checkpoint `path` (a local file), read without running code from it.

    `trusted`: read with the plain unpickler; None (default): as the environment variable
    ACM_D2_TRUST_CHECKPOINTS says. Raises UntrustedCheckpointError for a file that needs more than
    weights; other errors (a truncated file, not a pickle) are those of pickle / torch.load.
    """
    trusted = checkpoints_trusted() if trusted is None else trusted
    return (_load_pkl if path.endswith(".pkl") else _load_torch)(path, trusted)
