"""The training data stream of exact resume: batch `i` is a function of (seed, i, rank) only.

ResumableTrainStream replaces Detectron2's sampler -> ToIterableDataset -> DataLoader ->
AspectRatioGroupedDataset chain with one IterableDataset. It takes Detectron2's own sampler
(TrainingSampler, RepeatFactorTrainingSampler, RandomSubsetTrainingSampler) for the index stream, shards
it over ranks as that sampler does, groups by aspect ratio on the dataset dicts' width/height (what
AspectRatioGroupedDataset groups by) and hands whole batches to the DataLoader workers round-robin, which
the DataLoader returns in order. Resuming at iteration i replays only the integer index stream up to
batch i (no image is read) and starts there. Each sample is mapped (read, augmented) under generators
seeded from (seed, its position in the stream), and the global generators are restored afterwards, so
augmentation does not depend on which worker or process maps it, nor on where the run started.
acm_d2.engine.resume.ExactResumeHook sets the stream's seed and start from the checkpoint.
"""

import contextlib
import itertools
import logging
import random

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..compat import has_index_stream, sampler_index_stream, train_loader_arguments

__all__ = ["ResumableTrainStream", "build_resumable_train_loader", "derive_seed"]

logger = logging.getLogger(__name__)


def derive_seed(*entropy) -> int:
    """A 32-bit seed from non-negative integers (numpy's SeedSequence: well mixed, no collisions in practice)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_host_rngs(seed: int):
    """Run a block with the CPU torch, numpy and random generators seeded, then put back their state."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class ResumableTrainStream(IterableDataset):
    """This rank's infinite stream of mapped training batches, starting at batch `start_iter`.

    Args:
        dataset_dicts: the training dataset dicts (Detectron2 format, with width and height).
        mapper: called on a copy of one dict, returns the model input (None: try another image).
        sampler: a Detectron2 training sampler; its index stream (acm_d2.compat.sampler_index_stream),
            reseeded with `seed`, is the global index stream.
        batch_size: images per batch on this rank.
        aspect_ratio_grouping: batch only images that are all landscape or all portrait.
        seed: the stream's seed; set `seed` and `start_iter` before iterating (ExactResumeHook does).
    """

    def __init__(self, dataset_dicts, mapper, sampler, batch_size, aspect_ratio_grouping, seed):
        if not has_index_stream(sampler):
            raise ValueError(
                f"DATALOADER.SAMPLER_TRAIN: {type(sampler).__name__} has no reproducible index stream; "
                "use TrainingSampler, RepeatFactorTrainingSampler or RandomSubsetTrainingSampler"
            )
        self.landscape = np.array([d["width"] > d["height"] for d in dataset_dicts], dtype=bool)
        self.dataset = DatasetFromList(
            dataset_dicts, copy=False
        )  # serialized: cheap to share with workers
        self.mapper, self.sampler, self.batch_size = mapper, sampler, batch_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.seed, self.start_iter = int(seed), 0
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def index_batches(self):
        """This rank's batches from batch 0 on, as lists of (position in the global stream, dataset index)."""
        stream = itertools.islice(
            enumerate(sampler_index_stream(self.sampler, self.seed)),
            self.rank,
            None,
            self.world_size,
        )
        buckets = {False: [], True: []} if self.aspect_ratio_grouping else {None: []}
        for position, index in stream:
            bucket = buckets[bool(self.landscape[index]) if self.aspect_ratio_grouping else None]
            bucket.append((position, int(index)))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def map_one(self, position, index):
        """The mapped sample at `position`, drawn under generators seeded by (seed, position)."""
        with seeded_host_rngs(derive_seed(self.seed, position)):
            rng = np.random.default_rng([self.seed, position])
            for attempt in range(100):
                data = self.mapper(self.dataset[index])
                if data is not None:
                    return data
                if attempt == 2:
                    logger.warning(
                        f"The mapper returned None for dataset index {index} three times; trying others"
                    )
                index = int(rng.integers(len(self.dataset)))
        raise RuntimeError(
            f"the mapper returned None for 100 images in a row at stream position {position}"
        )

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        batches = itertools.islice(self.index_batches(), self.start_iter, None)
        for i, batch in enumerate(batches):
            if (
                i % num_workers == worker_id
            ):  # the DataLoader reads its workers round-robin, in order
                yield [self.map_one(position, index) for position, index in batch]


def build_resumable_train_loader(cfg, mapper=None, seed=None, dataset=None):
    """Detectron2's training data (datasets, mapper, sampler from cfg, as build_detection_train_loader)
    as a DataLoader over a ResumableTrainStream. `seed`: the stream seed, by default cfg.SEED when it is
    >= 0, else a random one shared by all ranks. `dataset`: the dataset dicts, if already loaded."""
    args = train_loader_arguments(cfg, mapper, dataset=dataset)
    world_size = comm.get_world_size()
    total = args["total_batch_size"]
    if total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH = {total} is not divisible by the number of processes ({world_size})"
        )
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    stream = ResumableTrainStream(
        args["dataset"],
        args["mapper"],
        args["sampler"],
        total // world_size,
        args["aspect_ratio_grouping"],
        seed,
    )
    # Its own generator: creating the iterator (at the first step) must not draw from the global one,
    # which ExactResumeHook has just seeded for that step.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=args["num_workers"],
        collate_fn=trivial_batch_collator,
        generator=torch.Generator().manual_seed(int(seed)),
    )
