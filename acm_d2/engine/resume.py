"""Exact resume: after `--resume` the training steps see the same images, augmentations and random draws
as an uninterrupted run with the same seed, so their losses are the same numbers.

Detectron2 restores the model, optimizer, LR scheduler, iteration and AMP grad scaler from a checkpoint,
but not the data stream (its TrainingSampler restarts at the start of its stream, and the aspect-ratio
grouping and data-loader workers restart empty) nor the random generators (proposal sampling and
augmentation draw from the global torch / numpy / random generators). The data stream is
acm_d2.data.stream.ResumableTrainStream; ExactResumeHook here seeds the global generators before every
step from (seed, rank, iteration), carries the stream seed in the checkpoint (needed when cfg.SEED < 0
draws one), and carries the recent EventStorage history so that smoothed metrics (metrics.json, the
console) after a resume equal those of the uninterrupted run.
"""

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..compat import history_state, restore_history
from ..data.stream import derive_seed

__all__ = ["ExactResumeHook"]

# How many recent values of each scalar the checkpoint keeps: the widest window that Detectron2's
# writers smooth over (JSONWriter, CommonMetricPrinter and TensorboardXWriter use 20).
HISTORY_WINDOW = 20


class ExactResumeHook(HookBase):
    """Makes a resumed run continue exactly (see the module doc). Put it first among the hooks.

    `stream` is the trainer's ResumableTrainStream, or None when the trainer uses another data loader
    (then only the per-step seeding and the metric history are restored).
    """

    def __init__(self, seed: int, stream=None):
        self.seed = int(seed)
        self.stream = stream
        self._pending_history = None

    def before_train(self):
        if self.stream is not None:
            self.stream.seed = self.seed
            self.stream.start_iter = self.trainer.start_iter
        if self._pending_history:
            restore_history(self.trainer.storage, self._pending_history)
            self._pending_history = None

    def before_step(self):
        seed_all_rng(derive_seed(self.seed, comm.get_rank(), self.trainer.iter))

    def state_dict(self):
        state = {"seed": self.seed}
        storage = getattr(self.trainer, "storage", None)
        if storage is not None:
            state["history"] = history_state(storage, HISTORY_WINDOW)
        elif (
            self._pending_history
        ):  # loaded, not yet restored (before training): it is still the state
            state["history"] = self._pending_history
        return state

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])
        self._pending_history = state_dict.get("history")
