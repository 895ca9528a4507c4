"""Sharded batch sampler shared by the map-style backends.

Training: a permutation seeded by (seed, epoch), rank r takes every world-th index of
it, truncated so all ranks get N // world samples (disjoint shards, equal step counts),
then full batches only (the partial last batch is dropped).
Evaluation: rank r takes the contiguous slice [r*N//world, (r+1)*N//world), in order, and
keeps its partial last batch: every image is evaluated exactly once, with no padding.
Batches are lists of (index, epoch) so a worker-side dataset can seed per sample.
`set_epoch(e, start_step=k)` makes the next iteration start at batch k of epoch e's order
(mid-epoch resume): the permutation is recomputed and sliced, no batch is decoded to skip.
"""
from __future__ import annotations

import numpy as np


class ShardBatchSampler:
    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, *, train: bool,
                 seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.train, self.seed, self.epoch = train, seed, 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Epoch `epoch`'s order; the next iteration yields batches start_step..len-1."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} outside 0..{len(self)} batches per epoch")
        self.epoch, self.start_step = epoch, start_step

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in iteration order."""
        if self.train:
            perm = np.random.default_rng((self.seed, self.epoch, 2**31 - 1)).permutation(self.n)
            per_rank = self.n // self.world
            shard = perm[self.rank::self.world][:per_rank]
            return shard[:len(self) * self.batch_size]
        lo = self.rank * self.n // self.world
        hi = (self.rank + 1) * self.n // self.world
        return np.arange(lo, hi)

    @property
    def num_images(self) -> int:
        if self.train:
            return len(self) * self.batch_size
        return (self.rank + 1) * self.n // self.world - self.rank * self.n // self.world

    def __len__(self) -> int:
        if self.train:
            return (self.n // self.world) // self.batch_size
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        idx = self.indices().tolist()
        start, self.start_step = self.start_step * self.batch_size, 0  # one iteration only
        for i in range(start, len(idx), self.batch_size):
            yield [(j, self.epoch) for j in idx[i:i + self.batch_size]]
