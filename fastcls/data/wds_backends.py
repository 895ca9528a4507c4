"""Tar shards (fastcls/data/wds.py) on the native batched GPU path and on DALI.

Both read the shard plan of the PIL-worker path (`ShardPlan`: the same shard order, rank
ranges, per-worker streams and buffer shuffle for the same `data.workers`), so the three
decode paths see the same samples in the same order, with crops from the same per-sample
generator (seed, epoch, sample id). Every member's bytes are screened
(fastcls.data.screen) before a decoder sees them, as files are.

- batched path (`BatchedShardLoader`): DataLoader workers stream their batches' members
  (`ShardReader.read_batch`: each shard read once, sequentially; `pipe:` URLs too) and
  hand over one buffer per batch; decode + kernel as for folders;
- DALI (`DaliShardLoader`): the parallel external source's workers are stateless (DALI
  gives a batch to whichever worker is idle), so they read by position
  (`ShardReader.read_positions`: one seek per sample into handles kept open): local shards
  with per-sample offsets in their index, which `convert --to wds` writes. `pipe:` shards
  cannot be read so; they go through the native backend.

A bad sample is replaced in training as on folders (another sample drawn from (seed,
epoch, sample id, 1)) where samples can be read by position, by another sample of the same
batch on a `pipe:` stream; it is dropped in validation; each is counted.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import LoaderBase, LoaderSpec
from .dali import DaliLoader, DaliSource
from .folder import DatasetError
from .native import worker_loader
from .native_batched import BatchedNativeLoader, collate_bytes
from .screen import screen
from .listfile import is_local
from .wds import (ShardPlan, ShardReader, ShardSet, _shard_name, _TaskSampler, open_shards,
                  sample_rng)

# --------------------------------------------------------------------------- shared


def shard_plan(shards: ShardSet, spec: LoaderSpec) -> ShardPlan:
    """The PIL-worker path's plan for these shards and this split (streams = data.workers)."""
    d = spec.data
    return ShardPlan(shards.counts, spec.batch_size, spec.rank, spec.world_size, train=spec.train,
                     seed=spec.seed, streams=d.workers, shuffle_buffer=d.wds.shuffle_buffer)


def random_access(shards: ShardSet) -> bool:
    """Samples can be read by position: local shards with per-sample offsets."""
    return all(o is not None for o in shards.offsets) and all(is_local(u) for u in shards.urls)


def position(shards: ShardSet, sid: int) -> tuple[int, int]:
    """Sample id -> (shard, sample in shard)."""
    shard = int(np.searchsorted(shards.starts, sid, side="right")) - 1
    return shard, sid - int(shards.starts[shard])


def sample_name(shards: ShardSet, sid: int) -> str:
    """"train-000003.tar:#17": the shard and the sample's position in it (the member key is
    not known without reading the shard; the PIL-worker path names it by key)."""
    shard, member = position(shards, sid)
    return f"{_shard_name(shards.urls[shard])}:#{member}"


class PlanOrder:
    """The sampler interface the folder loaders use (len, num_images, epoch, start_step,
    set_epoch, indices) over a ShardPlan; indices() are sample ids in batch order."""

    def __init__(self, plan: ShardPlan, shards: ShardSet):
        self.plan, self.shards, self.world = plan, shards, plan.world

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def num_images(self) -> int:
        return self.plan.num_images

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def start_step(self) -> int:
        return self.plan.start_step

    @start_step.setter
    def start_step(self, k: int) -> None:
        self.plan.start_step = k

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.plan.set_epoch(epoch, start_step)

    def indices(self, epoch: Optional[int] = None) -> np.ndarray:
        return epoch_sids(self.plan, self.shards, self.plan.epoch if epoch is None else epoch)


def epoch_sids(plan: ShardPlan, shards: ShardSet, epoch: int) -> np.ndarray:
    """This rank's sample ids of `epoch` in batch order (batch g = [g*B, g*B + len))."""
    out = []
    for g in range(len(plan)):
        s, m = plan.batch_positions(epoch, g)
        out.append(shards.starts[s] + m)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- batched path

class ShardBytes(Dataset):
    """A task (epoch, g) -> batch g's samples as the batched path's workers return them:
    (screened bytes, label, sample id, error or None, crop or None), crop = (top, left, h,
    w, flip, H, W) from the header and sample_rng(seed, epoch, sid)."""

    def __init__(self, reader: ShardReader, train: bool, scale, ratio, hflip: float, seed: int):
        self.reader, self.train = reader, train
        self.scale, self.ratio, self.hflip, self.seed = scale, ratio, hflip, seed

    def __len__(self) -> int:
        return self.reader.plan.n

    def __getitems__(self, tasks):
        (epoch, g), = tasks
        return [self._item(s, epoch) for s in self.reader.read_batch(epoch, g)]

    def _item(self, s, epoch: int):
        from .crop import sample_rrc
        why = s.error or screen(s.data)
        if why is not None:
            return b"", s.label, s.sid, why, None
        crop = None
        if self.train:
            try:
                from PIL import Image
                with Image.open(io.BytesIO(s.data)) as im:
                    width, height = im.size
                rng = sample_rng(self.seed, epoch, s.sid)
                box = sample_rrc(width, height, self.scale, self.ratio, rng)
                crop = (*box, bool(rng.random() < self.hflip), height, width)
            except Exception:  # unreadable header: the main process decides (decode error)
                crop = None
        return s.data, s.label, s.sid, None, crop


class BatchedShardLoader(BatchedNativeLoader):
    """The batched path (decode the batch in one call, one fused crop kernel) over shards."""

    def __init__(self, shards: ShardSet, spec: LoaderSpec):
        d = spec.data
        LoaderBase.__init__(self, shards.num_samples, spec)
        self.shards, self.classes = shards, shards.classes
        self.empty_classes, self.excluded = shards.empty_classes, 0
        self.plan = shard_plan(shards, spec)
        self.sampler = PlanOrder(self.plan, shards)
        self._init_decode(spec)
        self.reader = ShardReader(shards, self.plan, spec.key)
        self.loader = worker_loader(ShardBytes(self.reader, spec.train, self.scale, self.ratio,
                                               d.hflip, spec.seed),
                                    _TaskSampler(self.plan), collate_bytes, d.workers, d.timeout)
        self.timeout = d.timeout if d.workers > 0 else 0
        self._random_access = random_access(shards)

    def _name(self, idx: int) -> str:
        return sample_name(self.shards, idx)

    def _replacement_bytes(self, j: int, epoch: int):
        """(bytes, label, error) of sample id j, read by position (random-access shards)."""
        s, = self.reader.read_positions(*map(lambda v: [v], position(self.shards, j)))
        why = s.error or screen(s.data)
        return (b"", s.label, why) if why else (s.data, s.label, None)

    def _replace(self, key: int, epoch: int, batch=None):
        if self._random_access:
            return super()._replace(key, epoch, batch)
        # A pipe: stream cannot be read by position: another image of this batch stands in.
        rng = np.random.default_rng((self.seed, epoch, key, 1))
        good = [(img, label) for img, label in (batch or []) if img is not None]
        if not good:
            raise DatasetError(f"every sample of a batch failed to decode (e.g. {self._name(key)})")
        img, label = good[int(rng.integers(len(good)))]
        return img, label, rng


# --------------------------------------------------------------------------- DALI

class DaliShardSource(DaliSource):
    """The DALI source over shards: the plan's order; samples read by position."""

    def __init__(self, shards: ShardSet, plan_args: dict, **kw):
        super().__init__([], **kw)
        self.shards, self.plan_args = shards, plan_args
        self._reader: Optional[ShardReader] = None

    @property
    def size(self) -> int:
        return self.shards.num_samples

    def _plan(self) -> ShardPlan:
        return ShardPlan(self.shards.counts, **self.plan_args)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_sids(self._plan(), self.shards, epoch)}
        return self._orders[epoch]

    def _bytes(self, idx: int):
        if self._reader is None:  # in each worker process: its own open handles
            self._reader = ShardReader(self.shards, self._plan())
        s, = self._reader.read_positions(*map(lambda v: [v], position(self.shards, idx)))
        why = s.error or screen(s.data)
        return (b"", why, s.label) if why else (s.data, None, s.label)

    def __getstate__(self):  # open file handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_reader"] = None
        return state


class DaliShardLoader(DaliLoader):
    """DALI over local shards with per-sample offsets (see the module docstring)."""

    def __init__(self, shards: ShardSet, spec: LoaderSpec):
        if not random_access(shards):
            raise DatasetError(f"{spec.key}: data.backend=dali reads tar shards by position: local "
                               f"shards with offsets in their index (python -m fastcls.data.convert "
                               f"--to wds writes them); stream pipe:/remote shards with "
                               f"data.backend=native")
        from .folder import FolderIndex
        super().__init__(FolderIndex("", shards.classes, [], shards.empty_classes), spec)
        LoaderBase.__init__(self, shards.num_samples, spec)
        self.shards = shards
        self.plan = shard_plan(shards, spec)
        self.sampler = PlanOrder(self.plan, shards)
        self._plan_args = dict(batch_size=spec.batch_size, rank=spec.rank,
                               world_size=spec.world_size, train=spec.train, seed=spec.seed,
                               streams=spec.data.workers, shuffle_buffer=spec.data.wds.shuffle_buffer)

    def _source(self, epoch: int, step: int) -> DaliSource:
        return DaliShardSource(self.shards, self._plan_args, train=self.train,
                               batch_size=self.batch_size, rank=self.rank,
                               world_size=self.sampler.world, seed=self.seed, scale=self.scale,
                               ratio=self.ratio, hflip=self.hflip, image_size=self.image_size,
                               val_resize=self.val_resize, base_epoch=epoch, first_step=step,
                               known_bad=self.known_bad, data=self.data)

    def _name(self, idx: int) -> str:
        return sample_name(self.shards, idx)

    def _strict_check(self, idx: int) -> Optional[str]:
        raw, why, _ = self._source(0, 0)._bytes(idx)
        if why is not None:
            return why
        try:
            from torchvision.io import ImageReadMode, decode_image
            decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception as e:  # torchvision raises many types for bad data
            return f"{type(e).__name__}: {e}"
        return None


def build_batched_shard_loader(spec: LoaderSpec) -> BatchedShardLoader:
    return BatchedShardLoader(_shards(spec), spec)


def build_dali_shard_loader(spec: LoaderSpec) -> DaliShardLoader:
    return DaliShardLoader(_shards(spec), spec)


def _shards(spec: LoaderSpec) -> ShardSet:
    if spec.data.exclude:
        raise DatasetError(f"data.exclude applies to folders and list files; {spec.key} names "
                           f"shards, which the converter wrote without the bad files (convert "
                           f"--to wds --exclude FILE)")
    return open_shards(spec.path, spec.key, None if spec.train else spec.classes)
