"""The `ffcv` backend: `.beton` files (written by `python -m fastcls.tools.convert --to ffcv`)
read by FFCV's `Loader`, JPEG decode (libjpeg-turbo) + crop + resize in numba threads.

Pipelines (one per split, compiled by numba once per Loader):

    train image: RandomResizedCropRGBImageDecoder(size, data.rrc.scale, data.rrc.ratio)
                 -> RandomHorizontalFlip(data.hflip) -> ToTensor -> ToDevice(non_blocking, CUDA)
                 -> ToTorchImage(channels_last)
                 size = train_image_size(data, epoch): `set_epoch` sets the decoder's
                 output_size, as ffcv-imagenet does for progressive resizing (FFCV sizes its
                 buffers per epoch iterator, so nothing is recompiled)
    val image:   CenterCropRGBImageDecoder(size, ratio=size / data.val_resize), size =
                 val_image_size(data) (= Resize(val_resize) + CenterCrop(size)) -> same tail
    label:       IntDecoder -> ToTensor -> Squeeze -> ToDevice

then, on the device, uint8 -> float, ImageNet normalization, cast to `dtype`. This last step
is two torch element-wise ops rather than FFCV's `NormalizeImage`: that op needs cupy on the
GPU and produces only numpy dtypes (no bfloat16, the AMP dtype here).

Order and sharding: the same `RankOrder` as folders on the other paths, plugged into FFCV
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
unseeded per-thread `np.random` (FFCV GitHub issue #392), so they differ from run to run.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .base import LoaderBase, LoaderSpec, Normalizer, train_image_size, val_image_size
from .beton import import_ffcv, read_meta
from .source import DatasetError, RankOrder


def _rank_order(order: RankOrder):
    """A TraversalOrder instance yielding `order`'s ids for FFCV's Loader.

    FFCV accepts a TraversalOrder *instance* and calls it with the loader (loader.py:
    `isinstance(order, TraversalOrder)` then `order(self)`), hence `__call__`."""
    from ffcv.traversal_order.base import TraversalOrder

    class RankTraversal(TraversalOrder):
        def __init__(self):  # TraversalOrder.__init__ runs in __call__, with the loader
            self.order, self.skip = order, 0

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.order.ids(epoch)[self.skip:].astype(np.uint64)

    return RankTraversal()


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
    """The data interface (fastcls.data.base.Loader) over an FFCV `Loader` reading one `.beton`.

    Yields (images float N×3×H×W channels_last on `device`, ImageNet-normalized, `dtype`;
    labels int64 N on `device`). `set_epoch(epoch, start_step)` selects the epoch's order
    and where the next iteration starts."""

    def __init__(self, path: str, spec: LoaderSpec, verbose: bool = True):
        d, key, train = spec.data, spec.key, spec.train
        meta = read_meta(path, key)
        classes = None if train else spec.classes
        if classes is not None and list(classes) != meta["classes"]:
            missing = sorted(set(classes) - set(meta["classes"]))
            extra = sorted(set(meta["classes"]) - set(classes))
            raise DatasetError(f"{key}: classes of {path!r} differ from training's: "
                               f"missing {missing[:10]}, extra {extra[:10]}")
        order = d.ffcv.order
        if order == "quasi_random" and train and spec.world_size > 1:
            raise DatasetError("data.ffcv.order=quasi_random is single-process only (FFCV does "
                               "not implement it distributed); use data.ffcv.order=random")
        self.skipped_at_conversion: list[str] = meta.get("skipped", [])
        self.train, self.batch_size, self.device = train, spec.batch_size, spec.device
        self.data = d
        val_resize, hflip, device = d.val_resize, d.hflip, spec.device
        self._threads = torch.get_num_threads()

        import_ffcv()  # a clear error when missing; keeps torch.get_num_threads()
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        if train:
            size = train_image_size(d, 0)
            self._decoder = RandomResizedCropRGBImageDecoder((size, size), scale=tuple(d.rrc.scale),
                                                             ratio=tuple(d.rrc.ratio))
            image = [self._decoder]
            if hflip > 0:
                image.append(RandomHorizontalFlip(hflip))
        else:
            size = val_image_size(d)
            image = [CenterCropRGBImageDecoder((size, size), ratio=size / val_resize)]
        image.append(ToTensor())
        label = [IntDecoder(), ToTensor(), Squeeze(1)]
        if device.type == "cuda":  # on CPU the tensors already are where they must be
            image.append(ToDevice(device, non_blocking=True))
            label.append(ToDevice(device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True, convert_back_int16=False))

        n = int(meta["num_samples"])
        # bad_files stays empty: the converter removed undecodable files
        order = RankOrder(n, spec.batch_size, spec.rank, spec.world_size, train=train, seed=spec.seed)
        super().__init__(spec, order, meta["classes"], empty_classes=meta.get("empty_classes", []),
                         dataset_size=n)
        self.normalize = Normalizer(device, spec.dtype)
        if order == "quasi_random" and train:
            self._order = None
            ffcv_order = _quasi_random_order()
        else:
            self._order = _rank_order(self.order)
            ffcv_order = self._order
        try:
            self.loader = Loader(path, batch_size=spec.batch_size, num_workers=max(1, d.workers),
                                 os_cache=d.ffcv.os_cache, order=ffcv_order, distributed=False,
                                 seed=spec.seed, pipelines={"image": image, "label": label},
                                 drop_last=train, batches_ahead=d.ffcv.batches_ahead)
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
        if len(self.loader) != len(self.order):  # both implement the same last-batch rule
            raise AssertionError((len(self.loader), len(self.order)))
        self._compile(verbose and spec.rank == 0, spec.split)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch's order and seek (LoaderBase) and, in training, its image size: the
        decoder's output_size, read when the next epoch's buffers are allocated."""
        super().set_epoch(epoch, start_step)
        if self.train:
            size = train_image_size(self.data, epoch)
            self._decoder.output_size = (size, size)

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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip, self.order.start_step = self.order.start_step, 0
        skip_batches = 0
        if self._order is not None:
            self._order.skip = skip * self.batch_size  # seek: the order starts there
        else:
            skip_batches = skip  # QuasiRandom cannot seek: iterate past the first batches
        self.loader.next_epoch = self.order.epoch
        it = iter(self.loader)
        try:
            for k, (images, labels) in enumerate(it):
                if k == 0:  # FFCV's thread set torch's threads to num_workers before batch 0
                    torch.set_num_threads(self._threads)
                if k < skip_batches:
                    continue
                # labels: clone, FFCV reuses its output buffers (batches_ahead + 2 slots)
                yield self.normalize(images), labels.to(torch.int64).clone()  # normalize: a new tensor
        finally:
            it.close()
            if self._order is not None:
                self._order.skip = 0


def build_ffcv_loader(spec: LoaderSpec) -> FFCVLoader:
    """`build_loader` for data.backend=ffcv: the split is a .beton file; a folder (the demo
    dataset with data.demo) is converted once into the cache, in a subprocess."""
    path = spec.path
    if not path:
        raise DatasetError(f"{spec.key}: no file given; set {spec.key}=/path/to/{spec.split}.beton")
    if spec.data.demo and Path(path).is_dir():
        from ..tools.convert import ensure_beton
        from ..tools.demo import cache_dir
        path = ensure_beton(path, str(cache_dir() / "demo-v1-ffcv" / f"{Path(path).name}.beton"))
    return FFCVLoader(path, spec)
