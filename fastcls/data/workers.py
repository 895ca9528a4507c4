"""The PIL-worker decode path (`data.backend: native`, `data.native_decode: workers`, the
default on CPU), over any Source: PIL decoding in DataLoader workers.

Workers decode JPEGs with PIL, using `draft()` so libjpeg downscales in the DCT domain
(up to 8x) whenever the crop still covers the output size, then crop+resize in one
`Image.resize(box=...)` call, flip, and hand back uint8 HWC. The main process collates
uint8 (4x less to copy than float), pins it, and on the device converts to float,
normalizes and lays it out channels_last (on CUDA on a side stream, one batch ahead).
"""
from __future__ import annotations

import ctypes
import gc
import io
import math
import os
import signal
import sys
import threading
import time
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .base import LoaderSpec, Normalizer, SourceLoader, epoch_size, staged
from .sample import TRIES, Raw, candidates, train_crop, val_box
from .source import DatasetError

WORKER_TERM_GRACE_S = 30  # a worker outlives SIGTERM this long (see worker_init)


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
        top, left, ch, cw, flip, _, _ = train_crop(width, height, rng, scale, ratio, hflip)
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
    """An image file (path or file object): torchvision's Resize(resize) + CenterCrop(size)
    window, resized in one step: uint8 size×size×3 RGB."""
    with Image.open(src) as im:
        width, height = im.size
        if im.format == "JPEG":
            r = resize / min(width, height)
            im.draft("RGB", (math.ceil(width * r), math.ceil(height * r)))
        sx, sy = im.size[0] / width, im.size[1] / height
        rgb = to_rgb(im)
    left, top, bw, bh = val_box(width, height, resize, size)
    return np.asarray(rgb.resize((size, size), Image.BILINEAR,
                                 box=(left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)))


def worker_init(_: int) -> None:
    # The parent's objects are shared copy-on-write: the worker's gc would write into each
    # one's header and copy its page (~80 MB a worker over an epoch, measured); freeze them.
    gc.freeze()
    torch.set_num_threads(1)  # PIL work is single-threaded; don't oversubscribe cores
    # SLURM signals every process of a job step, DataLoader workers included; preemption is
    # the trainer's job (a worker dying first would crash the step in flight). So SIGUSR1 is
    # ignored and SIGTERM only arms a 30 s alarm (SLURM's KillWait): an orphan still ends.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, term_later)


def term_later(signum, frame) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WORKER_TERM_GRACE_S)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, *, pdeathsig: bool = True, poll_s: float = 1.0) -> str:
    """Make this (worker) process end when its parent `parent` ends, however the parent ends
    (a SIGKILL runs no cleanup: an OOM kill, scancel's escalation), so no worker outlives a
    killed trainer. torch's DataLoader workers watch their parent; DALI's Python workers do
    not, hence this call in their first task.

    With `pdeathsig` on Linux, prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills this
    process when the thread that started it ends; so only when that thread lives as long as
    the parent process (the main thread). Otherwise (or if prctl fails) a daemon thread polls
    the parent every `poll_s` seconds and exits the process once it is gone. Either way a
    parent already gone (before the call) ends this process now. -> "pdeathsig" | "watch"."""
    how = "watch"
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "pdeathsig"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # re-parented already: the parent died before the call
        os._exit(1)
    if how == "watch":
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(poll_s)
            os._exit(1)
        threading.Thread(target=watch, name="fastcls-parent-watch", daemon=True).start()
    return how


class Tasks(Dataset):
    """The DataLoader's dataset on both worker paths: a task [(epoch, g)] (what an Order
    yields) -> `make(epoch, g)`, batch g of the epoch, already collated."""

    def __init__(self, make):
        self.make = make

    def __getitems__(self, tasks):
        (epoch, g), = tasks
        return self.make(epoch, g)


def _as_is(batch):
    return batch


def worker_loader(make, order, workers: int, timeout: float, pin_memory: bool = False) -> DataLoader:
    """The DataLoader both worker paths use: batch g of `order` made by `make(epoch, g)` in
    one of `workers` persistent processes (0: in the main process), 4 batches each in
    flight, SLURM-safe signal handling, and `timeout` seconds per batch so a hung
    filesystem is an error, not a hang."""
    return DataLoader(Tasks(make), batch_sampler=order, num_workers=workers, collate_fn=_as_is,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=worker_init if workers > 0 else None,
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


class PilBatch:
    """In a worker: batch g of `epoch` of the source -> (uint8 N×S×S×3, int64 labels,
    ["name: reason" of the samples that failed]). Each sample is decoded with its crop
    drawn from its own generator (fastcls.data.sample), at the epoch's size (data.progressive
    in training, data.val_image_size in validation); a bad one is replaced in training
    (the replacement rule, counted) and dropped in evaluation (counted)."""

    def __init__(self, source, spec: LoaderSpec):
        d = self.data = spec.data
        self.source, self.train, self.seed = source, spec.train, spec.seed
        self.scale, self.ratio, self.hflip, self.val_resize = d.rrc.scale, d.rrc.ratio, d.hflip, d.val_resize

    def __call__(self, epoch: int, g: int):
        batch = self.source.read_batch(epoch, g)
        size, errors = epoch_size(self.data, self.train, epoch), []
        out = [self.decode(raw, epoch, batch, size, errors) for raw in batch]
        kept = [o for o in out if o is not None]
        images = torch.from_numpy(np.stack([a for a, _ in kept])) if kept else \
            torch.empty((0, size, size, 3), dtype=torch.uint8)
        return images, torch.tensor([label for _, label in kept], dtype=torch.int64), errors

    def decode(self, raw: Raw, epoch: int, batch: list[Raw], size: int, errors: list[str]):
        tried = []
        for _, cand, rng in candidates(self.source, raw, epoch, self.seed, train=self.train, batch=batch):
            why = cand.error
            if why is None:
                try:
                    src = io.BytesIO(cand.data)
                    arr = decode_train(src, size, self.scale, self.ratio, self.hflip, rng) if self.train \
                        else decode_val(src, size, self.val_resize)
                    errors += tried
                    return arr, cand.label
                except Exception as e:  # any undecodable file: PIL raises many types
                    why = f"{type(e).__name__}: {e}"
            tried.append(f"{cand.name}: {why}")
        errors += tried
        if self.train:
            raise DatasetError(f"{TRIES} samples in a row failed to decode: {tried}")
        return None


class WorkersLoader(SourceLoader):
    """The data interface (fastcls.data.base.Loader) over PIL-decoding DataLoader workers.
    The main process stages the copy + normalize of the next batches in a thread (on a side
    stream on CUDA): uint8 NHWC viewed as NCHW is channels_last, so nothing is copied
    before the device."""

    def __init__(self, source, spec: LoaderSpec):
        super().__init__(source, spec)
        d = spec.data
        self.loader = worker_loader(PilBatch(source, spec), self.order, d.workers, d.timeout,
                                    pin_memory=d.pin_memory and spec.device.type == "cuda")
        self.timeout = d.timeout if d.workers > 0 else 0
        self.normalize = Normalizer(spec.device, spec.dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_files = []
        yield from staged(batches_with_timeout(iter(self.loader), self.timeout), self._stage, self.device,
                          side=self.side_stream)

    def _stage(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, errors = batch
        self._account(errors)
        return self.normalize(images.permute(0, 3, 1, 2)), labels.to(self.device, non_blocking=True)
