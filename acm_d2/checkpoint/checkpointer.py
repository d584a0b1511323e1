"""A DetectionCheckpointer that writes atomically and says clearly what is wrong with a checkpoint.

Saving: fvcore writes `model_*.pth` in place and then overwrites `last_checkpoint`, so a process killed
mid-write leaves a truncated `.pth` that `last_checkpoint` may already name (or will, on the next
resume, name the previous file while a half-written one sits beside it). Here both files are written to
a hidden temporary file in the same folder, flushed, fsync'ed and moved into place with os.replace (an
atomic rename on POSIX and Windows), and the folder is fsync'ed: after a kill at any moment every
`*.pth` is complete and `last_checkpoint` names a complete file. A killed save leaves at most a hidden
`.*.tmp` file, which `remove_stale_temporaries` deletes.

Loading: every file is read without running code from it (acm_d2.checkpoint.safe_load: a restricted
unpickler for .pkl, torch.load(weights_only=True) otherwise). A missing, unreadable (truncated, not a
PyTorch file), untrusted (it asks for more than weights) or foreign checkpoint (no model state dict, no
key in common with the model, or backbone tensors of other shapes) is a CheckpointError naming the
file. Resuming (loading the optimizer too) from a checkpoint whose tensors have other shapes than the
model's (a changed NUM_CLASSES or NUM_GROUPS) is a CheckpointError naming the keys and shapes, instead of
a size mismatch inside the first optimizer step. With `require_complete=True` (evaluation, the attention
tool) a checkpoint that leaves any model parameter at its initialisation is an error. Otherwise, loading a
checkpoint without context-module weights (an ImageNet or baseline checkpoint into an ACM model) logs one
summary that separates the context-module keys, which are expected to be missing, from any other
missing key.
"""

import glob
import logging
import os
from collections.abc import Mapping

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..compat import call_overridden, clear_checkpointer_url_state
from ..utils.files import TMP_SUFFIX, atomic_write
from .safe_load import CheckpointError, load_checkpoint

__all__ = ["AtomicCheckpointer", "CheckpointError", "is_context_key"]

logger = logging.getLogger(__name__)


def is_context_key(key: str) -> bool:
    """Whether a state-dict key belongs to a context module (ACM or a peer) of an acm_d2 backbone block."""
    return ".context." in key


def _group(keys, limit=8):
    """A short, readable list of keys: their module prefixes, with counts."""
    groups = {}
    for key in sorted(keys):
        prefix = key.rsplit(".", 1)[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    items = [f"{p} ({n})" if n > 1 else p for p, n in groups.items()]
    more = f", ... and {len(items) - limit} more modules" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and explicit errors for unusable checkpoints (see module doc).

    Remote save folders (a `scheme://` path served by Detectron2's PathManager) keep fvcore's writes.
    `require_complete`: refuse a checkpoint that leaves any model parameter at its initialisation (for
    evaluating or inspecting a trained model, where such a parameter would be random).
    """

    def __init__(self, model, save_dir="", *, require_complete=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.require_complete = require_complete
        self._loading, self._resuming = (
            None,
            False,
        )  # the file being loaded; whether with training state

    def _local(self) -> bool:
        return "://" not in self.save_dir

    # ---- saving -----------------------------------------------------------------------------------
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            "w",
        )

    def remove_stale_temporaries(self) -> list:
        """Delete the temporary files that a killed save left in save_dir; return their paths."""
        if not self.save_dir or not self.save_to_disk or not self._local():
            return []
        stale = glob.glob(os.path.join(self.save_dir, f".*{TMP_SUFFIX}"))
        stale = [
            p for p in stale if os.path.basename(p).startswith((".model_", ".last_checkpoint."))
        ]
        for path in stale:
            os.remove(path)
        if stale:
            self.logger.warning(
                f"Removed {len(stale)} incomplete checkpoint file(s) left by an interrupted save: {stale}"
            )
        return stale

    # ---- loading ----------------------------------------------------------------------------------
    def load(self, path, checkpointables=None):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} does not exist (check MODEL.WEIGHTS, or last_checkpoint in OUTPUT_DIR)"
            )
        if not path and self.require_complete:
            raise CheckpointError(
                "no checkpoint given (MODEL.WEIGHTS is empty): the model would keep its random initialisation"
            )
        self._loading = path
        # Restoring training state (optimizer, ...) along with the model: every tensor must fit it.
        self._resuming = bool(self.checkpointables if checkpointables is None else checkpointables)
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading, self._resuming = None, False
            clear_checkpointer_url_state(self)

    def _torch_load(self, f):
        try:
            loaded = load_checkpoint(f)
        except CheckpointError:  # refused, naming the file and why
            raise
        except Exception as error:
            raise CheckpointError(
                f"cannot read checkpoint {f!r} ({type(error).__name__}: {str(error)[:300]}): the file is truncated "
                "(an interrupted copy or save) or is not a PyTorch checkpoint"
            ) from error
        if not isinstance(loaded, Mapping):
            raise CheckpointError(
                f"checkpoint {f!r} holds a {type(loaded).__name__}, not a dict with a model state dict"
            )
        return loaded

    def _load_file(self, filename):
        try:
            if filename.endswith((".pkl", ".pyth")):
                loaded = self._load_other_format(filename)
            else:
                # .pth: Detectron2's URL handling, then _torch_load
                loaded = call_overridden(AtomicCheckpointer, self, "_load_file", filename)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"cannot read checkpoint {filename!r} ({type(error).__name__}: {str(error)[:300]})"
            ) from error
        state = loaded.get("model")
        if not isinstance(state, Mapping) or not state:
            raise CheckpointError(
                f"checkpoint {filename!r} has no model state dict (its 'model' entry is {type(state).__name__})"
            )
        bad = [k for k, v in state.items() if not isinstance(k, str) or not hasattr(v, "shape")]
        if bad:
            raise CheckpointError(
                f"checkpoint {filename!r} is not a model state dict: {len(bad)} entries are not named tensors, e.g. {bad[0]!r}"
            )
        return loaded

    def _load_other_format(self, filename):
        """DetectionCheckpointer._load_file's .pkl (Detectron2 / Caffe2 model zoo) and .pyth (pycls)
        branches, with the file read by load_checkpoint instead of the plain pickle / torch.load."""
        data = load_checkpoint(filename)
        if not isinstance(data, Mapping):
            raise CheckpointError(
                f"checkpoint {filename!r} holds a {type(data).__name__}, not a dict with a model state dict"
            )
        if filename.endswith(".pyth"):
            if "model_state" not in data:
                raise CheckpointError(
                    f"cannot load {filename!r}: a pycls .pyth checkpoint must contain 'model_state'"
                )
            state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if "model" in data and "__author__" in data:  # Detectron2 model zoo format
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        data = data.get(
            "blobs", data
        )  # Caffe2 / Detectron1: detection models keep their weights in "blobs"
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint):
        incompatible = call_overridden(AtomicCheckpointer, self, "_load_model", checkpoint)
        name = self._loading or "the checkpoint"
        model_keys = set(self.model.state_dict())
        missing = set(incompatible.missing_keys)
        if model_keys and missing >= model_keys - {"pixel_mean", "pixel_std"}:
            raise CheckpointError(
                f"checkpoint {name!r} shares no parameter with this model (its keys are e.g. "
                f"{sorted(incompatible.unexpected_keys)[:3]}): it is a checkpoint of another model"
            )
        reshaped = incompatible.incorrect_shapes
        if reshaped and (self._resuming or self.require_complete):
            # Detectron2 would skip these tensors; resuming would then fail inside the first optimizer step
            # (its state has the old shapes), and an evaluated model would have random layers.
            changed = "; ".join(
                f"{k}: {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in reshaped[:6]
            )
            more = f"; and {len(reshaped) - 6} more" if len(reshaped) > 6 else ""
            fix = (
                "To train the changed model, start a new run in another OUTPUT_DIR with MODEL.WEIGHTS "
                f"{name} (fine-tuning: the changed layers start from their initialisation); to continue "
                "the old run, restore its config."
                if self._resuming
                else "Use the config these weights were trained with."
            )
            raise CheckpointError(
                f"checkpoint {name!r} does not fit this model: {len(reshaped)} tensors have another shape (the "
                f"config changed since it was saved, e.g. MODEL.ROI_HEADS.NUM_CLASSES or MODEL.ACM.NUM_GROUPS): "
                f"{changed}{more}. {fix}"
            )
        backbone_shapes = [s for s in reshaped if s[0].startswith("backbone.")]
        if backbone_shapes:
            key, in_file, in_model = backbone_shapes[0]
            raise CheckpointError(
                f"checkpoint {name!r} is for another backbone: {len(backbone_shapes)} backbone tensors have other "
                f"shapes, e.g. {key} is {tuple(in_file)} in the file but {tuple(in_model)} in the model "
                "(check MODEL.RESNETS.DEPTH, NUM_GROUPS, WIDTH_PER_GROUP, MODEL.FPN.OUT_CHANNELS and, for "
                "context-module keys, MODEL.ACM.NUM_GROUPS and REDUCTION)"
            )
        context = sorted(k for k in missing if is_context_key(k))
        other = sorted(k for k in missing if not is_context_key(k))
        if self.require_complete and missing:
            raise CheckpointError(
                f"checkpoint {name!r} does not hold {len(missing)} parameters of this model, which would stay randomly "
                f"initialised ({len(context)} of them context-module (ACM) parameters): {_group(missing)}. "
                "Give a checkpoint trained with this config (e.g. OUTPUT_DIR/model_final.pth)."
            )
        if context or other:
            msg = f"Loaded {name}: "
            if context:
                msg += (
                    f"{len(context)} context-module (ACM) parameters are not in it and keep their initialisation "
                    "(expected for an ImageNet or baseline checkpoint). "
                )
            if other:
                msg += f"{len(other)} other parameters are missing too and keep their initialisation: {_group(other)}."
            else:
                msg += "No other parameter is missing."
            (self.logger.warning if other else self.logger.info)(msg)
        return incompatible
