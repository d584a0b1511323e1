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

Anything else is an UntrustedCheckpointError naming the file and the class it wanted; so is a numpy
array of Python objects (dtype object), which no file of weights holds. Files built to exhaust the
reader are CheckpointErrors naming the file, before the harm: containers nested deeper than
MAX_NESTING (recursive code, and the deallocation of nested numpy arrays, would overflow the C
stack), a numpy array asking for memory before its data is read, and a `.pth` (zip) record that
declares far more bytes than it stores (torch.load would allocate the declared size before inflating
it). For a file you trust (e.g. one you wrote yourself with other objects in it), opt in with the environment variable
ACM_D2_TRUST_CHECKPOINTS=1 or the tools' --trust-checkpoint flag: it is then read with the plain
(code-running) pickle / torch.load(weights_only=False).
"""

import io
import os
import pickle
import re
import zipfile

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "UntrustedCheckpointError",
    "load_checkpoint",
    "checkpoints_trusted",
    "TRUST_ENV",
    "TRUST_FLAG_HELP",
    "SAFE_PICKLE_GLOBALS",
    "MAX_NESTING",
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


# Checkpoints nest a few levels (trainer state -> hooks -> history -> metric -> values); Python's
# recursion limit is 1000.
MAX_NESTING = 100
# torch.save stores its records uncompressed; a compressed record may inflate to this many times its
# stored size (deflate gets ~1.1x on float weights), and always to ZIP_SMALL_RECORD bytes.
ZIP_MAX_EXPANSION = 20
ZIP_SMALL_RECORD = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that would run code or build objects other than weights when read."""


def checkpoints_trusted() -> bool:
    """Whether the user opted in to reading checkpoints with the plain, code-running unpickler."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


class _Refused(Exception):
    """Raised inside the unpickler: the file asks for `wanted` (a phrase), which weights do not need."""

    def __init__(self, wanted, untrusted=True):
        super().__init__(wanted)
        self.wanted, self.untrusted = wanted, untrusted


OBJECT_ARRAY = "a numpy array of Python objects (dtype object)"
_BUILT_OTHERWISE = "a numpy array built other than numpy pickles one"


def _array_type(*args):
    """Stands for numpy.ndarray in a pickle: numpy names the class only as _reconstruct's first
    argument; the class itself, called from the pickle, would allocate any shape it is given."""
    raise _Refused(_BUILT_OTHERWISE, untrusted=False)


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Refused(OBJECT_ARRAY)
    return dtype


def _reconstruct(subtype, shape, dtype_spec):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") and fills it from the state that follows.
    if subtype is not _array_type or tuple(shape) != (0,):
        raise _Refused(_BUILT_OTHERWISE, untrusted=False)
    return np.ndarray((0,), _plain_dtype(dtype_spec))


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise _Refused(f"the Python object {module + '.' + name!r}")
        if name == "ndarray":
            return _array_type
        if name == "dtype":
            return _plain_dtype
        if name == "_reconstruct":
            return _reconstruct
        return super().find_class(module, name)


def _refuse(path, wanted):
    why = (
        "which a file of weights does not hold (the model would fail on it far from this file)"
        if wanted == OBJECT_ARRAY
        else "which a file of weights does not need and which could run code"
    )
    raise UntrustedCheckpointError(
        f"refusing to read checkpoint {path!r}: it asks for {wanted}, {why}; {HOW_TO_TRUST}"
    )


def _load_pkl(path, trusted):
    with open(path, "rb") as f:
        data = f.read()
    if trusted:
        return pickle.loads(data, encoding="latin1")
    try:
        return _WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as refused:
        if refused.untrusted:
            _refuse(path, refused.wanted)
        raise CheckpointError(
            f"refusing to read checkpoint {path!r}: it asks for {refused.wanted}, which would allocate "
            "memory before reading any data; it was not written by pickling numpy arrays"
        ) from None


def _check_zip_records(path):
    """Refuses a `.pth` whose zip records declare far more bytes than they store, before torch.load
    allocates the declared size."""
    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format
    with zipfile.ZipFile(path) as zf:
        for record in zf.infolist():
            limit = max(ZIP_SMALL_RECORD, ZIP_MAX_EXPANSION * record.compress_size)
            if record.file_size > limit:
                raise CheckpointError(
                    f"refusing to read checkpoint {path!r}: its record {record.filename!r} declares "
                    f"{record.file_size} bytes from {record.compress_size} stored (more than "
                    f"{ZIP_MAX_EXPANSION}x): reading it would allocate that much first. torch.save "
                    f"stores records uncompressed; {HOW_TO_TRUST}"
                )


def _containers_in(item):
    """The items a container holds (dict keys too), or None for anything else."""
    if isinstance(item, dict):
        return [*item.keys(), *item.values()]
    if isinstance(item, (list, tuple, set, frozenset)):
        return item
    return None


def _check_nesting(path, obj):
    """Refuses containers nested more than MAX_NESTING deep or holding themselves, and numpy arrays of
    objects, walking the loaded object without recursion (so that no recursive code meets them). A
    container reached twice is walked once; its height (longest chain below it) counts on each path."""
    heights, on_path, stack = {}, set(), [(obj, False)]

    def too_deep():
        return CheckpointError(
            f"refusing to read checkpoint {path!r}: it nests containers more than {MAX_NESTING} "
            "deep (a file of weights nests a few), deeper than code that walks it recursively can go"
        )

    while stack:
        item, leaving = stack.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            _refuse(path, OBJECT_ARRAY)
        children = _containers_in(item)
        if children is None or id(item) in heights:
            continue
        if leaving:
            on_path.discard(id(item))
            heights[id(item)] = 1 + max((heights.get(id(c), 0) for c in children), default=0)
            if heights[id(item)] + len(on_path) > MAX_NESTING:
                raise too_deep()
            continue
        if id(item) in on_path:
            raise CheckpointError(
                f"refusing to read checkpoint {path!r}: a container in it holds itself, which no file "
                "of weights does"
            )
        on_path.add(id(item))
        if len(on_path) > MAX_NESTING:  # early, before walking the rest of a long chain
            raise too_deep()
        stack.append((item, True))
        stack.extend((child, False) for child in children)


def _load_torch(path, trusted):
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    _check_zip_records(path)
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
    weights, CheckpointError for one built to exhaust the reader (see the module's docstring); other
    errors (a truncated file, not a pickle) are those of pickle / torch.load.
    """
    trusted = checkpoints_trusted() if trusted is None else trusted
    loaded = (_load_pkl if path.endswith(".pkl") else _load_torch)(path, trusted)
    if not trusted:
        _check_nesting(path, loaded)
    return loaded
