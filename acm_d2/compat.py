"""The private Detectron2 / fvcore internals acm_d2 relies on, in one place.

Detectron2 has no public hook for these; each is used for a reason given beside it. `check()` verifies
that every one still exists with the shape acm_d2 expects, and tests/test_compat.py runs it, so an
upgrade that moves one fails there, with its name, rather than deep inside a training run.

Private methods that acm_d2 *overrides* in subclasses are listed in OVERRIDDEN (class, method, the
parameters acm_d2 calls or receives); an override reaches Detectron2's own version through
`call_overridden`, and every other access goes through the functions below. tests/test_compat.py scans
acm_d2/ and tools/ and fails on any other `._name` access on, or override of, a Detectron2/fvcore
private name.
"""

import inspect
from typing import Dict, Iterator, List

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetMapper
from detectron2.data import build as data_build
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.utils.events import EventStorage
from fvcore.common.history_buffer import HistoryBuffer

__all__ = [
    "OVERRIDDEN",
    "call_overridden",
    "check",
    "sampler_index_stream",
    "has_index_stream",
    "train_loader_arguments",
    "history_state",
    "restore_history",
    "clear_checkpointer_url_state",
    "transform_annotations",
    "set_inner_trainer",
    "trainer_hooks",
    "last_eval_results",
]

# (class, private method, parameter names) that acm_d2's subclasses override or call through super():
OVERRIDDEN = [
    # AtomicCheckpointer: read files through the safe loader; check shapes when resuming.
    (DetectionCheckpointer, "_load_file", ["self", "filename"]),
    (DetectionCheckpointer, "_torch_load", ["self", "f"]),
    (DetectionCheckpointer, "_load_model", ["self", "checkpoint"]),
    # The trainer's non-finite check names the loss terms before Detectron2's own FloatingPointError.
    (SimpleTrainer, "_write_metrics", ["self", "loss_dict", "data_time", "prefix", "iter"]),
    # ACMRes5ROIHeads: a C4 model's res5 built with context modules (a classmethod: cls is bound).
    (Res5ROIHeads, "_build_res5_block", ["cfg"]),
]


def call_overridden(owner: type, obj, name: str, *args, **kwargs):
    """`super(owner, obj).<name>(*args, **kwargs)`: an OVERRIDDEN method's next implementation after
    `owner` (Detectron2's), called from acm_d2's override of it. Refuses a name OVERRIDDEN lacks."""
    if not any(name == n and isinstance(obj, cls) for cls, n, _ in OVERRIDDEN):
        raise ValueError(
            f"{type(obj).__name__}.{name} is not in acm_d2.compat.OVERRIDDEN; add it there (with the "
            "parameters acm_d2 relies on) before calling Detectron2's private method"
        )
    return getattr(super(owner, obj), name)(*args, **kwargs)


def sampler_index_stream(sampler, seed: int) -> Iterator[int]:
    """The infinite index stream of a Detectron2 training sampler, reseeded with `seed`. Detectron2's
    samplers (TrainingSampler, RepeatFactorTrainingSampler, RandomSubsetTrainingSampler) draw it in
    `_infinite_indices()` from `_seed`; the exact-resume stream replays it from the start."""
    sampler._seed = int(seed)
    return sampler._infinite_indices()


def has_index_stream(sampler) -> bool:
    return hasattr(sampler, "_infinite_indices") and hasattr(sampler, "_seed")


def train_loader_arguments(cfg, mapper=None, dataset=None) -> Dict:
    """What build_detection_train_loader gets from cfg (dataset, mapper, sampler, total_batch_size,
    aspect_ratio_grouping, num_workers), from Detectron2's own `_train_loader_from_config`."""
    return data_build._train_loader_from_config(cfg, mapper, dataset=dataset)


def history_state(storage: EventStorage, window: int) -> Dict[str, Dict]:
    """The last `window` values of every scalar history in `storage`, with the running count and global
    average that fvcore's HistoryBuffer keeps privately (exact resume restores them)."""
    state = {}
    for name, buffer in storage.histories().items():
        values = [(float(v), int(i)) for v, i in buffer.values()[-window:]]
        state[name] = {
            "values": values,
            "count": int(buffer._count),
            "global_avg": float(buffer._global_avg),
        }
    return state


def restore_history(storage: EventStorage, state: Dict[str, Dict]) -> None:
    """Put back what history_state saved (EventStorage keeps its HistoryBuffers in a defaultdict)."""
    for name, saved in state.items():
        buffer = storage._history[name]
        buffer._data = [tuple(v) for v in saved["values"]]
        buffer._count, buffer._global_avg = saved["count"], saved["global_avg"]


def clear_checkpointer_url_state(checkpointer) -> None:
    """DetectionCheckpointer resets its URL-parsing state only after a successful load and asserts on it
    at the next one; a failed load must reset it too."""
    checkpointer._parsed_url_during_load = None


def transform_annotations(mapper: DatasetMapper, dataset_dict, transforms, image_shape) -> None:
    """DatasetMapper's annotation step (apply transforms, build Instances), for a mapper that reads the
    image itself (Detectron2's __call__ has no hook for the image read)."""
    mapper._transform_annotations(dataset_dict, transforms, image_shape)


def set_inner_trainer(trainer: DefaultTrainer, inner: SimpleTrainer) -> None:
    """DefaultTrainer delegates run_step to `self._trainer`; acm_d2 swaps in its own SimpleTrainer/AMPTrainer."""
    trainer._trainer = inner


def trainer_hooks(trainer: TrainerBase) -> List:
    """The hooks registered on a Detectron2 trainer, in order (TrainerBase keeps them in `_hooks`)."""
    return list(trainer._hooks)


def last_eval_results(trainer: DefaultTrainer) -> Dict:
    """The results of DefaultTrainer's last evaluation (its EvalHook keeps them in `_last_eval_results`;
    train() returns them only when TEST.EXPECTED_RESULTS is set); {} before any evaluation."""
    return dict(getattr(trainer, "_last_eval_results", None) or {})


def check() -> List[str]:
    """The internals above that this Detectron2 / fvcore lack or changed, as messages ([] when all fine)."""
    problems = []
    for cls, name, params in OVERRIDDEN:
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"{cls.__module__}.{cls.__name__}.{name} no longer exists")
        elif [p for p in inspect.signature(method).parameters] != params:
            got = list(inspect.signature(method).parameters)
            problems.append(f"{cls.__name__}.{name} takes {got}, acm_d2 expects {params}")
    sampler = TrainingSampler(4, seed=0)
    if not has_index_stream(sampler):
        problems.append("detectron2 TrainingSampler has no _infinite_indices/_seed (exact resume)")
    if not hasattr(data_build, "_train_loader_from_config"):
        problems.append("detectron2.data.build._train_loader_from_config no longer exists")
    buffer = HistoryBuffer()
    buffer.update(1.0)
    if not all(hasattr(buffer, a) for a in ("_data", "_count", "_global_avg")):
        problems.append(
            "fvcore HistoryBuffer lost _data/_count/_global_avg (exact resume of metrics)"
        )
    with EventStorage() as storage:
        if not hasattr(storage, "_history"):
            problems.append("detectron2 EventStorage has no _history")
    if not hasattr(DatasetMapper, "_transform_annotations"):
        problems.append("detectron2 DatasetMapper._transform_annotations no longer exists")
    if "_parsed_url_during_load" not in inspect.getsource(DetectionCheckpointer):
        problems.append("DetectionCheckpointer no longer has _parsed_url_during_load")
    if "self._trainer" not in inspect.getsource(DefaultTrainer.__init__):
        problems.append("DefaultTrainer no longer delegates to self._trainer")
    if "self._hooks" not in inspect.getsource(TrainerBase.__init__):
        problems.append("detectron2 TrainerBase no longer keeps its hooks in self._hooks")
    if "self._last_eval_results =" not in inspect.getsource(DefaultTrainer.build_hooks):
        problems.append("DefaultTrainer no longer keeps its evaluation in self._last_eval_results")
    return problems
