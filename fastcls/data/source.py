"""A Source: which samples a split holds, their classes, this rank's order of them per
epoch, and reading one sample or a batch as screened bytes + label (docs/design.md).

Every decode path (fastcls.data.workers, .batched, .dali) is written against this class
only; a new dataset format is one Source subclass in one file plus its line in
`fastcls.data.SOURCES`. What a subclass provides:

    claims(path) -> bool         (static) does data.train/data.val name this format?
    open(spec) -> Source         (class) open the split `spec.path` for `spec`'s rank
    classes, empty_classes, excluded, num_samples
    random_access                can any sample be read alone, by `read(sid)`?
    read(sid) -> Raw             the sample `sid`, screened (random access only)
    read_batch(epoch, g) -> [Raw]  batch g of `order` in `epoch` (default: read each id)
    name(sid) -> str             how messages name sample `sid`
    order                        this rank's epoch order: a RankOrder unless the format
                                 needs its own (tar shards: a ShardPlan)

The order is computed from counts alone, so every rank and worker process computes it
without reading data; sources are pickled into worker processes (spawn) or inherited
(fork), so they hold no open handles across a pickle and no per-sample Python objects.
"""
from __future__ import annotations

from functools import cached_property
from typing import Iterator

import numpy as np

from .sample import Raw


class DatasetError(ValueError):
    """A dataset problem the user must fix (missing path, no images, class mismatch)."""


class Order:
    """This rank's batches of one epoch after another: `len(order)` batches per epoch,
    batch g of `batch(epoch, g)` sample ids. Iterating yields one task [(epoch, g)] per
    batch from `start_step` on (a DataLoader batch sampler: task p goes to worker
    p % workers); `set_epoch(e, k)` makes the next iteration start at batch k of epoch e
    (a mid-epoch resume: nothing before it is read)."""

    steps: int
    images: int

    def __init__(self, batch_size: int, rank: int, world_size: int, *, train: bool, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batch_size, self.rank, self.world, self.train, self.seed = batch_size, rank, world_size, train, seed
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.steps

    @property
    def num_images(self) -> int:
        """Images this rank yields per epoch (training: full batches only)."""
        return self.images

    def batch_len(self, g: int) -> int:
        return min(self.batch_size, self.images - g * self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} outside 0..{len(self)} batches per epoch")
        self.epoch, self.start_step = epoch, start_step

    def batch(self, epoch: int, g: int) -> np.ndarray:
        raise NotImplementedError

    def ids(self, epoch: int) -> np.ndarray:
        """Every sample id of the epoch for this rank, in batch order."""
        out = [self.batch(epoch, g) for g in range(len(self))]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, self.start_step = self.start_step, 0  # a seek applies to one iteration only
        for g in range(start, len(self)):
            yield [(self.epoch, g)]


class RankOrder(Order):
    """The order of sources read by position. Training: a permutation seeded by (seed,
    epoch); rank r takes every world-th id of it, truncated so all ranks get n // world
    (disjoint, equal step counts), then full batches only. Evaluation: rank r takes the
    contiguous ids [r*n//world, (r+1)*n//world) in order and keeps its partial last batch:
    every image is scored exactly once, with no padding."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, *, train: bool,
                 seed: int = 0):
        super().__init__(batch_size, rank, world_size, train=train, seed=seed)
        self.n = n
        if train:
            self.steps = (n // world_size) // batch_size
            self.images = self.steps * batch_size
        else:
            self.images = (rank + 1) * n // world_size - rank * n // world_size
            self.steps = -(-self.images // batch_size)
        self._ids: dict[int, np.ndarray] = {}

    def ids(self, epoch: int) -> np.ndarray:
        if epoch not in self._ids:  # one epoch kept: a permutation of n per call is costly
            if self.train:
                perm = np.random.default_rng((self.seed, epoch, 2**31 - 1)).permutation(self.n)
                ids = perm[self.rank::self.world][:self.images]
            else:
                lo = self.rank * self.n // self.world
                ids = np.arange(lo, lo + self.images)
            ids.setflags(write=False)
            self._ids = {epoch: ids}
        return self._ids[epoch]

    def batch(self, epoch: int, g: int) -> np.ndarray:
        return self.ids(epoch)[g * self.batch_size:(g + 1) * self.batch_size]


class Source:
    """Base class of the dataset formats (see the module docstring)."""

    random_access = True
    classes: list[str]
    empty_classes: list[str] = []
    excluded = 0
    num_samples: int

    def __init__(self, spec):
        self.spec = spec
        self.key = spec.key

    @cached_property
    def order(self) -> Order:
        s = self.spec
        return RankOrder(self.num_samples, s.batch_size, s.rank, s.world_size, train=s.train, seed=s.seed)

    def read(self, sid: int) -> Raw:
        raise NotImplementedError

    def read_batch(self, epoch: int, g: int) -> list[Raw]:
        return [self.read(int(s)) for s in self.order.batch(epoch, g)]
