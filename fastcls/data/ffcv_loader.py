"""The `ffcv` backend: `.beton` files (written by `python -m fastcls.data.convert --to ffcv`)
read by FFCV's `Loader`, JPEG decode (libjpeg-turbo) + crop + resize in numba threads.

Pipelines (one per split, compiled by numba once per Loader):

    train image: RandomResizedCropRGBImageDecoder(image_size, data.rrc.scale, data.rrc.ratio)
                 -> RandomHorizontalFlip(data.hflip) -> ToTensor -> ToDevice(non_blocking, CUDA)
                 -> ToTorchImage(channels_last)
    val image:   CenterCropRGBImageDecoder(image_size, ratio=image_size / data.val_resize)
                 (= Resize(val_resize) + CenterCrop(image_size)) -> same tail
    label:       IntDecoder -> ToTensor -> Squeeze -> ToDevice

then, on the device, uint8 -> float, ImageNet normalization, cast to `dtype`. This last step
is two torch element-wise ops rather than FFCV's `NormalizeImage`: that op needs cupy on the
GPU and produces only numpy dtypes (no bfloat16, the AMP dtype here).

Order and sharding: the same `ShardBatchSampler` as the native backend, plugged into FFCV
as a `TraversalOrder` (= OrderOption.RANDOM's seeded per-epoch permutation, then disjoint
equal shards, partial last batch dropped in training, kept and never duplicated in
evaluation). FFCV's own `distributed=True` wraps torch's `DistributedSampler(drop_last=
False)`, which pads a shard by repeating images: evaluation would count some images twice
and the training step count would differ from the other backends', so it is not used.
`data.ffcv.order: quasi_random` (FFCV's page-local shuffle for datasets larger than RAM,
with `data.ffcv.os_cache: false`) is single-process only: FFCV does not implement it
distributed.

Reproducibility: the sample ORDER is seeded by (train.seed, epoch) and identical to the
native backend's. The CROP boxes and FLIPS are not: FFCV draws them with numba's
unseeded per-thread `np.random` (upstream issue 392), so they differ from run to run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .base import MEAN, STD, LoaderBase
from .folder import DatasetError
from .sampler import ShardBatchSampler

INSTALL = ("apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
           "pip install 'fastcls[ffcv]'")
ORDERS = ("random", "quasi_random")


def import_ffcv():
    """Import ffcv, keeping torch's thread count (`import ffcv` sets it to 1)."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        import ffcv.fields.decoders  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        return ffcv
    except (ImportError, OSError) as e:  # OSError: a system library (libturbojpeg...) missing
        raise DatasetError(f"data.backend=ffcv: ffcv cannot be imported ({e}); run: {INSTALL}") from None
    finally:
        torch.set_num_threads(threads)


def read_meta(path: str, key: str) -> dict:
    """The class list etc. that the converter wrote next to the .beton."""
    from .convert import FORMAT, meta_path
    p = Path(path)
    if not p.is_file():
        hint = (f"; convert the folder first: python -m fastcls.data.convert --to ffcv {path} "
                f"{p.name or 'split'}.beton" if p.is_dir() else "")
        raise DatasetError(f"{key}: data.backend=ffcv reads a .beton file, and {path!r} is "
                           f"{'a directory' if p.is_dir() else 'not a file'}{hint}")
    m = meta_path(p)
    if not m.is_file():
        raise DatasetError(f"{key}: {path!r} has no class list {m.name} next to it; write .beton "
                           f"files with: python -m fastcls.data.convert --to ffcv SRC_DIR {p.name}")
    try:
        meta = json.loads(m.read_text())
        assert meta.get("format") == FORMAT and isinstance(meta["classes"], list)
    except (ValueError, AssertionError, KeyError):
        raise DatasetError(f"{key}: {m} is not a fastcls FFCV metadata file ({FORMAT})") from None
    return meta


def _shard_order(sampler: ShardBatchSampler):
    """A TraversalOrder instance yielding `sampler`'s order for FFCV's Loader.

    FFCV accepts a TraversalOrder *instance* and calls it with the loader (loader.py:
    `isinstance(order, TraversalOrder)` then `order(self)`), hence `__call__`."""
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        def __init__(self):  # TraversalOrder.__init__ runs in __call__, with the loader
            self.shard, self.skip = sampler, 0

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            self.shard.set_epoch(epoch)
            return self.shard.indices()[self.skip:].astype(np.uint64)

    return ShardOrder()


def _quasi_random_order():
    """FFCV's QUASI_RANDOM order, made a function of (seed, epoch): upstream shuffles its
    page table in place, so asking for the same epoch twice (a resume) gave another order."""
    from ffcv.traversal_order.quasi_random import QuasiRandom

    class ReproducibleQuasiRandom(QuasiRandom):
        def __init__(self):  # QuasiRandom.__init__ runs in __call__, with the loader
            pass

        def __call__(self, loader):
            QuasiRandom.__init__(self, loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            pages = self.page_to_samples_array.copy()
            try:
                return super().sample_order(epoch)
            finally:
                self.page_to_samples_array = pages

    return ReproducibleQuasiRandom()


class FFCVLoader(LoaderBase):
    """The data interface (DESIGN.md) over an FFCV `Loader` reading one `.beton`.

    Yields (images float N×3×H×W channels_last on `device`, ImageNet-normalized, `dtype`;
    labels int64 N on `device`). `set_epoch(epoch, start_step)` selects the epoch's order
    and where the next iteration starts."""

    def __init__(self, path: str, *, key: str, train: bool, batch_size: int, image_size: int,
                 val_resize: int, scale, ratio, hflip: float, workers: int, device: torch.device,
                 dtype: torch.dtype, rank: int, world_size: int, seed: int, order: str = "random",
                 os_cache: bool = True, batches_ahead: int = 3,
                 classes: Optional[Sequence[str]] = None, verbose: bool = True):
        meta = read_meta(path, key)
        if classes is not None and list(classes) != meta["classes"]:
            missing = sorted(set(classes) - set(meta["classes"]))
            extra = sorted(set(meta["classes"]) - set(classes))
            raise DatasetError(f"{key}: classes of {path!r} differ from training's: "
                               f"missing {missing[:10]}, extra {extra[:10]}")
        if order not in ORDERS:
            raise DatasetError(f"data.ffcv.order: unknown {order!r}; valid: {', '.join(ORDERS)}")
        if order == "quasi_random" and train and world_size > 1:
            raise DatasetError("data.ffcv.order=quasi_random is single-process only (FFCV does "
                               "not implement it distributed); use data.ffcv.order=random")
        self.classes: list[str] = meta["classes"]
        self.empty_classes: list[str] = meta.get("empty_classes", [])
        self.skipped_at_conversion: list[str] = meta.get("skipped", [])
        self.train, self.batch_size, self.device, self.dtype = train, batch_size, device, dtype
        self._threads = torch.get_num_threads()

        import_ffcv()  # a clear error when missing; keeps torch.get_num_threads()
        from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder,
                                          RandomResizedCropRGBImageDecoder)
        from ffcv.loader import Loader
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        size = (image_size, image_size)
        if train:
            image = [RandomResizedCropRGBImageDecoder(size, scale=tuple(scale), ratio=tuple(ratio))]
            if hflip > 0:
                image.append(RandomHorizontalFlip(hflip))
        else:
            image = [CenterCropRGBImageDecoder(size, ratio=image_size / val_resize)]
        image.append(ToTensor())
        label = [IntDecoder(), ToTensor(), Squeeze(1)]
        if device.type == "cuda":  # on CPU the tensors already are where they must be
            image.append(ToDevice(device, non_blocking=True))
            label.append(ToDevice(device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True, convert_back_int16=False))

        n = int(meta["num_samples"])
        # bad_files stays empty: the converter removed undecodable files
        super().__init__(n, batch_size, rank, world_size, train=train, seed=seed)
        self.dataset_size = n
        if order == "quasi_random" and train:
            self._order = None
            ffcv_order = _quasi_random_order()
        else:
            self._order = _shard_order(self.sampler)
            ffcv_order = self._order
        try:
            self.loader = Loader(path, batch_size=batch_size, num_workers=max(1, workers),
                                 os_cache=os_cache, order=ffcv_order, distributed=False, seed=seed,
                                 pipelines={"image": image, "label": label}, drop_last=train,
                                 batches_ahead=batches_ahead)
        except DatasetError:
            raise
        except Exception as e:  # a truncated or foreign file surfaces as many error types
            raise DatasetError(f"{key}: cannot read {path!r} as an FFCV .beton "
                               f"({type(e).__name__}: {e})") from None
        finally:
            torch.set_num_threads(self._threads)  # Loader sets torch threads to num_workers
        if self.loader.reader.num_samples != n:
            raise DatasetError(f"{key}: {path!r} holds {self.loader.reader.num_samples} samples, "
                               f"its {Path(path).name}.json says {n}: re-convert it")
        if len(self.loader) != len(self.sampler):  # both implement the same last-batch rule
            raise AssertionError((len(self.loader), len(self.sampler)))
        self._compile(verbose and rank == 0, "train" if train else "val")

    def _compile(self, verbose: bool, split: str) -> None:
        """Run one batch now so numba's JIT (seconds) happens here, not in the first epoch's
        img/s."""
        from ffcv.pipeline.compiler import Compiler
        jit = Compiler.is_enabled
        if verbose and jit:
            print(f"ffcv: compiling the {split} pipeline (numba JIT, once per loader; "
                  f"not counted in img/s)...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        it = iter(self.loader)
        try:
            next(it)
        except StopIteration:
            pass
        finally:
            it.close()
            torch.set_num_threads(self._threads)
        if verbose and jit:
            print(f"ffcv: {split} pipeline compiled in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W channels_last (FFCV's reused buffer) -> new normalized tensor."""
        mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
        x = images.float().sub_(mean).mul_(inv_std)  # .float() keeps channels_last
        return x.to(self.dtype, memory_format=torch.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip, self.sampler.start_step = self.sampler.start_step, 0
        skip_batches = 0
        if self._order is not None:
            self._order.skip = skip * self.batch_size  # seek: the order starts there
        else:
            skip_batches = skip  # QuasiRandom cannot seek: iterate past the first batches
        self.loader.next_epoch = self.sampler.epoch
        it = iter(self.loader)
        try:
            for k, (images, labels) in enumerate(it):
                if k == 0:  # FFCV's thread set torch's threads to num_workers before batch 0
                    torch.set_num_threads(self._threads)
                if k < skip_batches:
                    continue
                # labels: clone, FFCV reuses its output buffers (batches_ahead + 2 slots)
                yield self._normalize(images), labels.to(torch.int64).clone()
        finally:
            it.close()
            if self._order is not None:
                self._order.skip = 0


def build_ffcv_loader(cfg, split: str, device: torch.device, *, batch_size: int, rank: int,
                      world_size: int, dtype: torch.dtype, classes=None,
                      path: Optional[str] = None) -> FFCVLoader:
    """`build_loader` for data.backend=ffcv: data.train/data.val are .beton files; with
    data.demo the demo folders are converted once into the cache (in a subprocess)."""
    d = cfg.data
    key = f"data.{split}"
    if path is None:
        if d.demo:
            from .convert import ensure_beton
            from .demo import cache_dir, ensure_demo_dataset
            folder = ensure_demo_dataset()[0 if split == "train" else 1]
            path = ensure_beton(folder, str(cache_dir() / "demo-v1-ffcv" / f"{split}.beton"))
        else:
            path = d.train if split == "train" else d.val
    if not path:
        raise DatasetError(f"{key}: no file given; set {key}=/path/to/{split}.beton")
    f = d.ffcv
    return FFCVLoader(path, key=key, train=split == "train", batch_size=batch_size,
                      image_size=d.image_size, val_resize=d.val_resize, scale=d.rrc.scale,
                      ratio=d.rrc.ratio, hflip=d.hflip, workers=d.workers, device=device,
                      dtype=dtype, rank=rank, world_size=world_size, seed=cfg.train.seed,
                      order=f.order, os_cache=f.os_cache, batches_ahead=f.batches_ahead,
                      classes=classes if split != "train" else None)
