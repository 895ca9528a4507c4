"""The `native` backend, CPU path: PIL decoding in DataLoader workers.

Workers decode JPEGs with PIL, using `draft()` so libjpeg downscales in the DCT domain
(up to 8x) whenever the crop still covers the output size, then crop+resize in one
`Image.resize(box=...)` call, flip, and hand back uint8 HWC. The main process collates
uint8 (4x less to copy than float), pins it, and on the device converts to float,
normalizes and lays it out channels_last (on CUDA on a side stream, one batch ahead).
"""
from __future__ import annotations

import io
import math
import signal
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .base import LoaderBase, LoaderSpec, Normalizer, staged, train_image_size, val_image_size
from .crop import center_crop_box, sample_rrc
from .folder import DatasetError, FolderIndex
from .screen import read_screened

_REPLACEMENT_TRIES = 10
_WORKER_TERM_GRACE_S = 30  # a worker outlives SIGTERM this long (see _worker_init)


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any PIL mode. 16-bit grayscale ("I;16", "I") keeps its high
    byte: PIL's own convert("RGB") clips it at 255 (a white image, silently)."""
    if im.mode.startswith("I"):
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def decode_train(src, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 hflip: float, rng: np.random.Generator) -> np.ndarray:
    """An image file (path or file object) -> random-resized-crop, maybe flipped: uint8
    size×size×3 RGB."""
    with Image.open(src) as im:
        width, height = im.size
        top, left, ch, cw = sample_rrc(width, height, scale, ratio, rng)
        flip = rng.random() < hflip
        if im.format == "JPEG":
            # Ask for the smallest DCT scale at which the crop still has >= size pixels.
            im.draft("RGB", (math.ceil(width * size / cw), math.ceil(height * size / ch)))
        sx, sy = im.size[0] / width, im.size[1] / height
        rgb = to_rgb(im)
    out = rgb.resize((size, size), Image.BILINEAR,
                     box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def decode_val(src, size: int, resize: int) -> np.ndarray:
    """An image file (path or file object): shorter side to `resize`, center crop `size`:
    uint8 size×size×3 RGB."""
    with Image.open(src) as im:
        width, height = im.size
        if im.format == "JPEG":
            r = resize / min(width, height)
            im.draft("RGB", (math.ceil(width * r), math.ceil(height * r)))
        sx, sy = im.size[0] / width, im.size[1] / height
        rgb = to_rgb(im)
    l, t, r_, b = center_crop_box(width, height, resize, size)
    return np.asarray(rgb.resize((size, size), Image.BILINEAR, box=(l * sx, t * sy, r_ * sx, b * sy)))


class FolderDataset(Dataset):
    """Map-style dataset keyed by (index, epoch), so a sample's random crop depends only on
    (seed, epoch, index), whichever worker decodes it, and so does its size: training crops
    are `train_image_size(data, epoch)` px (progressive resizing changes them per epoch
    inside the persistent workers, no restart), validation crops `val_image_size(data)`.

    Returns (uint8 H×W×3 tensor, int label, list of "path: error" for files that failed).
    A file that fails to decode is replaced in training by another sample (counted), and
    dropped in evaluation (label -1, counted) so no image is scored twice.
    """

    def __init__(self, index: FolderIndex, train: bool, data: DataConfig, seed: int):
        self.samples = index.samples
        self.train, self.data, self.val_resize = train, data, data.val_resize
        self.scale, self.ratio, self.hflip, self.seed = data.rrc.scale, data.rrc.ratio, data.hflip, seed

    def size(self, epoch: int) -> int:
        return train_image_size(self.data, epoch) if self.train else val_image_size(self.data)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        idx, epoch = key
        rng = np.random.default_rng((self.seed, epoch, idx))
        size = self.size(epoch)
        # A replacement for a bad file comes from a generator of its own, (seed, epoch,
        # index, 1), which then also draws its crop: the batched path's replacements.
        replace = np.random.default_rng((self.seed, epoch, idx, 1))
        errors = []
        for _ in range(_REPLACEMENT_TRIES if self.train else 1):
            path, label = self.samples[idx]
            raw, why = read_screened(path)  # the bytes are read here anyway: screen them
            if why is None:
                try:
                    if self.train:
                        arr = decode_train(io.BytesIO(raw), size, self.scale, self.ratio,
                                           self.hflip, rng)
                    else:
                        arr = decode_val(io.BytesIO(raw), size, self.val_resize)
                    return torch.from_numpy(arr.copy()), label, errors
                except Exception as e:  # any undecodable file: PIL raises many types
                    why = f"{type(e).__name__}: {e}"
            errors.append(f"{path}: {why}")
            idx, rng = int(replace.integers(len(self.samples))), replace
        if self.train:
            raise DatasetError(f"{_REPLACEMENT_TRIES} files in a row failed to decode: {errors}")
        return torch.zeros(size, size, 3, dtype=torch.uint8), -1, errors


def collate_uint8(batch):
    """-> (N×H×W×3 uint8, N int64 labels, list of errors); drops samples with label -1."""
    errors = [e for item in batch for e in item[2]]
    kept = [item for item in batch if item[1] >= 0]
    if kept:
        images = torch.stack([item[0] for item in kept])
    else:
        images = torch.empty((0, *batch[0][0].shape), dtype=torch.uint8)
    labels = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    return images, labels, errors


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # PIL work is single-threaded; don't oversubscribe cores
    # SLURM signals every process of a job step, DataLoader workers included. Preemption is
    # the trainer's job (finish the step, checkpoint, shut the workers down): a worker dying
    # first would crash the step in flight (torch's SIGCHLD handler raises in the trainer).
    # So SIGUSR1 is ignored, and SIGTERM only arms a 30 s alarm (SLURM's default KillWait):
    # the worker still ends if nobody shuts it down, e.g. multiprocessing's terminate()+join().
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _term_later)


def _term_later(signum, frame) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(_WORKER_TERM_GRACE_S)


def worker_loader(dataset: Dataset, sampler, collate, workers: int, timeout: float,
                  pin_memory: bool = False) -> DataLoader:
    """The DataLoader both native paths use: `workers` persistent processes (0: in the main
    process), 4 batches each in flight, SLURM-safe signal handling, and `timeout` seconds
    per batch so a hung filesystem is an error, not a hang."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      timeout=timeout if workers > 0 else 0)


def batches_with_timeout(it, timeout: float):
    """Batches of a DataLoader iterator `it`; a worker timeout becomes a DatasetError that
    names data.timeout."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if timeout and "timed out" in str(e):
                raise DatasetError(f"no batch from the data workers for data.timeout="
                                   f"{timeout:g} s (hung filesystem or stuck decode?); "
                                   f"raise data.timeout or set 0 to wait forever") from None
            raise
        yield batch


class NativeLoader(LoaderBase):
    """The data interface (fastcls.data.base.Loader) over a DataLoader of PIL workers."""

    def __init__(self, index: FolderIndex, spec: LoaderSpec):
        d = spec.data
        super().__init__(len(index.samples), spec)
        self.classes, self.empty_classes, self.excluded = index.classes, index.empty_classes, index.excluded
        self.device = spec.device
        self.dataset = FolderDataset(index, spec.train, d, spec.seed)
        self.loader = worker_loader(self.dataset, self.sampler, collate_uint8, d.workers, d.timeout,
                                    pin_memory=d.pin_memory and spec.device.type == "cuda")
        self.timeout = d.timeout if d.workers > 0 else 0
        self.normalize = Normalizer(spec.device, spec.dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_files = []
        # The copy + normalize of the next batches runs in a thread (on a side stream on
        # CUDA) while the model steps.
        yield from staged(batches_with_timeout(iter(self.loader), self.timeout), self._stage,
                          self.device)

    def _stage(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, errors = batch
        self._account(errors)
        # NHWC uint8 viewed as NCHW is the channels_last layout: no copy before the device
        return self.normalize(images.permute(0, 3, 1, 2)), labels.to(self.device, non_blocking=True)
