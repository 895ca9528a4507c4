"""The data interface (docs/design.md, docs/data.md) and what the backends share behind it:
`Loader` (the protocol every loader satisfies, synthetic included), `LoaderSpec` (one split's
settings, resolved once by `build_loader`), `LoaderBase` (length, images per epoch,
`set_epoch(epoch, start_step)` from an `Order`, the classes, the bad-file limit) and
`SourceLoader` (the same over a Source: the base of every decode path), `Normalizer` (uint8 ->
normalized float on the device), `staged` (the next batches prepared in a background thread,
on a side stream on CUDA), `train_image_size` / `val_image_size` (every backend's crop sizes).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..config import DataConfig
from .source import DatasetError

# ImageNet statistics in 0..255 units.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@runtime_checkable
class Loader(Protocol):
    """What `build_loader` returns, for every backend.

    Iterating yields one epoch of (images, labels) for this rank: images float N×3×H×W,
    channels_last, ImageNet-normalized, `dtype`, on the training device; labels int64 (N,)
    on the same device. Training drops the partial last batch; evaluation keeps it and
    never repeats an image, so every image is scored once across ranks."""

    classes: list[str]        # class names; label i is classes[i]
    dataset_size: int         # images in the split (all ranks)
    bad_files: list[str]      # "path: reason" of the files that failed this epoch, this rank
    excluded: int             # files data.exclude dropped before the loader saw them
    empty_classes: list[str]  # class folders without images (a warning)

    def __len__(self) -> int:
        """Steps per epoch for this rank."""

    @property
    def num_images(self) -> int:
        """Images this rank yields per epoch."""

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Epoch `epoch`'s order and, for training, its image size
        (`train_image_size(data, epoch)`); the next iteration starts at batch `start_step`."""

    def epoch_warnings(self) -> list[str]:
        """Lines the trainer logs after an epoch (e.g. decoder fallbacks); [] when none."""

    def close(self) -> None:
        """Stop the loader's worker processes now (idempotent); iterating again starts them
        again. The trainer and the commands call it on the way out, however they end."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def train_image_size(data: DataConfig, epoch: int) -> int:
    """Side in pixels of the training crops of `epoch` (counted from 0, as the training loop
    and ffcv-imagenet's `get_resolution` count): `data.image_size` while progressive
    resizing is off (`data.progressive.start_size == 0`), else ffcv-imagenet's rule:
    start_size up to start_epoch, end_size (0 = data.image_size) from end_epoch on, and in
    between the linear interpolation in the epoch rounded (half to even, as np.round) to a
    multiple of `multiple`, kept within [start_size, end_size]. A pure function of the config
    and the epoch, so a resumed run and every worker process agree on it."""
    p = data.progressive
    if not p.start_size:
        return data.image_size
    end = p.end_size or data.image_size
    if epoch <= p.start_epoch:
        return p.start_size
    if epoch >= p.end_epoch:
        return end
    size = np.interp(epoch, [p.start_epoch, p.end_epoch], [p.start_size, end])
    return int(min(max(int(np.round(size / p.multiple)) * p.multiple, p.start_size), end))


def val_image_size(data: DataConfig) -> int:
    """Side in pixels of the validation center crops: `data.val_image_size`, 0 = image_size."""
    return data.val_image_size or data.image_size


def epoch_size(data: DataConfig, train: bool, epoch: int) -> int:
    """Output side in pixels of `epoch`'s images: training's size of the epoch
    (data.progressive) or the validation size."""
    return train_image_size(data, epoch) if train else val_image_size(data)


@dataclass(frozen=True)
class LoaderSpec:
    """One split's loader, as `build_loader` resolved it; backends read their settings
    (sizes, crop, workers, their own sub-section) from `data`."""

    split: str                    # "train" | "val"
    path: str                     # the split's folder or file
    data: DataConfig
    batch_size: int               # per process
    device: torch.device
    dtype: torch.dtype            # images' dtype
    rank: int
    world_size: int
    seed: int                     # train.seed
    num_classes: int              # model.num_classes (the synthetic backend's label range)
    classes: Optional[Sequence[str]] = None  # val: training's classes, which must match

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def key(self) -> str:
        """The config key naming this split's data, for error messages."""
        return f"data.{self.split}"


class LoaderBase:
    """What every loader over an `Order` shares: its length, images per epoch and epoch seek,
    the class list, and the per-epoch bad-file accounting.

    `bad_files` holds the "name: reason" of each undecodable sample met this epoch on this
    rank, once (reset by the loader per iteration). `bad_files_fix` ends the
    too-many-bad-files message: what to do about them."""

    bad_files_fix = "remove or fix them"

    def __init__(self, spec: LoaderSpec, order, classes: list[str], *, empty_classes=(),
                 excluded: int = 0, dataset_size: int = 0):
        self.spec, self.order = spec, order
        self.classes, self.empty_classes, self.excluded = classes, list(empty_classes), excluded
        self.dataset_size = dataset_size
        self.train, self.device, self.dtype, self.data = spec.train, spec.device, spec.dtype, spec.data
        self.side_stream = SideStream(spec.device)  # staged()'s stream on CUDA, for every epoch
        self.bad_files: list[str] = []
        self.max_bad_fraction = spec.data.max_bad_fraction

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_images(self) -> int:
        """Images this rank yields per epoch (train: full batches only)."""
        return self.order.num_images

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reshuffle for `epoch`; the next iteration starts at batch `start_step` of it
        (mid-epoch resume: the order is sliced, nothing is decoded to skip)."""
        self.order.set_epoch(epoch, start_step)

    def size(self, epoch: int) -> int:
        return epoch_size(self.data, self.train, epoch)

    def epoch_warnings(self) -> list[str]:
        return []

    def close(self) -> None:
        """The persistent DataLoader workers of `self.loader`, when it is a torch DataLoader
        (the native and shard loaders); other backends override or have none."""
        loader = getattr(self, "loader", None)
        if isinstance(loader, torch.utils.data.DataLoader):
            shutdown_workers(loader)

    def _account(self, errors: list[str]) -> None:
        """Add a batch's failures ("path: reason") to `bad_files`, each file once per epoch
        (a replacement may draw a bad file again); stop past the limit."""
        if not errors:
            return
        seen = {e.split(": ", 1)[0] for e in self.bad_files}
        for e in errors:
            path = e.split(": ", 1)[0]
            if path not in seen:
                seen.add(path)
                self.bad_files.append(e)
        self._check_bad_limit()

    def _check_bad_limit(self) -> None:
        """DatasetError naming the bad files once more than max_bad_fraction of the epoch's
        images are bad."""
        allowed = math.floor(self.max_bad_fraction * self.num_images)
        if len(self.bad_files) > allowed:
            shown = "\n  ".join(self.bad_files[:20])
            raise DatasetError(
                f"{len(self.bad_files)} undecodable files this epoch on this rank, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} of {self.num_images} allows; "
                f"{self.bad_files_fix}:\n  {shown}")


def shutdown_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop a DataLoader's persistent workers now, while their queues are intact.

    torch offers no public call for it: the workers stop when the DataLoader's iterator is
    freed. If something keeps the loader alive (a stored exception's traceback holds every
    calling frame: seen with matplotlib's first import inside the run), that happens in the
    garbage collector, which may finalize the index queues before the iterator, so the
    workers never receive their stop message and each outlives the run by its SIGTERM grace
    (workers.worker_init): +70 s at the exit of a 2-worker run, measured. Hence this call,
    made on the way out of every run."""
    it, loader._iterator = loader._iterator, None
    if it is not None and hasattr(it, "_shutdown_workers"):  # the single-process iterator has none
        it._shutdown_workers()


class Normalizer:
    """uint8 N×3×H×W (any memory format: an NHWC batch permuted to NCHW *is* channels_last,
    no copy) on any device -> float N×3×H×W channels_last on `device`, (x - mean) / std in
    0..255 units, cast to `dtype`. Mean and 1/std are built on the device once: a
    `torch.tensor(...)` per batch would be a blocking host-to-device copy. They are built on
    the constructing thread's stream; `staged` orders the side stream after the consumer's
    once (SideStream `after`) before it reads them."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.inv_std = (1.0 / torch.tensor(STD, device=device, dtype=torch.float32)).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()  # strides (layout) preserved
        x = x.sub_(self.mean).mul_(self.inv_std)
        return x.to(self.dtype, memory_format=torch.channels_last)


class SideStream:
    """A loader's side stream on CUDA, created on first use and kept for the loader's life:
    `staged` runs every epoch and every evaluation on it. A stream per call would strand each
    epoch's memory pool (the caching allocator reuses a block only on the stream that
    allocated it: ~1 GB at batch 256 / 224 px, until an allocation fails and forces a
    device-wide sync + cudaFree). Calling it returns the stream, or None off CUDA (nothing
    created). `factory` (torch.cuda.Stream) is a parameter so a CPU test can count it.

    `after`: the consumer's stream; the new stream waits on it once, when it is created, so
    what the loader built on the consumer's stream before its first batch (the Normalizer's
    mean and 1/std) is complete before the side stream reads it. Once: later epochs do not
    queue their staging behind the training kernels in flight."""

    def __init__(self, device: torch.device, factory: Optional[Callable[[torch.device], Any]] = None):
        self.device, self.factory = device, factory or torch.cuda.Stream
        self._stream = None
        self._lock = threading.Lock()

    def __call__(self, after=None):
        if self.device.type != "cuda":
            return None
        with self._lock:  # the staging thread asks; one stream even if two ever ask at once
            if self._stream is None:
                stream = self.factory(self.device)
                if after is not None:
                    stream.wait_stream(after)
                self._stream = stream
            return self._stream


class _Failed:
    """An exception raised in the staging thread, carried to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def threaded(items: Iterator[Any], fn: Callable[[Any], Any], *, depth: int = 2, name: str = "fastcls-stage",
             setup: Callable[[], None] = lambda: None) -> Iterator[Any]:
    """Yield `fn(item)` for each item, computed up to `depth` items ahead by a background
    thread (`setup()` runs first in it). An exception in the thread is raised here, in
    order. Closing this generator early stops the thread after the item it is on and joins
    it before returning; the thread closes `items` when it stops (a generator there is
    closed in the thread that iterated it, so a nested `threaded` is stopped and joined too)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            setup()
            for item in items:
                if stop.is_set() or not put(fn(item)):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() and wait for the item in hand
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def staged(batches: Iterator[Any], stage: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
           device: torch.device, *, decode: Optional[Callable[[Any], Any]] = None,
           side: Optional[SideStream] = None, depth: int = 2,
           sync_side_stream: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `stage(batch)` for each batch, with up to `depth` batches staged ahead by a
    background thread, so that reading, decoding and the crop kernel of the next batches
    never hold the training thread (torchvision's CUDA batch decode ends with a stream
    synchronize, nvImageCodec waits on its future; both release the GIL).

    `decode`: a first stage in a thread of its own: batch k + 1 is decoded while `stage`
    runs the host preparation and kernel of batch k (`stage` then receives `decode(batch)`),
    so the decoder's host wait is hidden behind the rest rather than added to it.

    On CUDA both threads work on the loader's side stream `side` (one per loader, reused by
    every epoch; without one, a stream for this call only; one stream, so a batch's kernel
    is ordered after its decode) and the last records an event per batch; the consumer's
    stream waits on that event before it uses the batch, and `record_stream` keeps the
    allocator from reusing the tensors' memory while the consumer still reads them.
    `sync_side_stream`: the decoding thread waits for the side stream's previous work before
    it decodes the next batch (for decoders that do not order themselves after the current
    stream: torchvision's CUDA decode_jpeg).

    An exception in a thread (a bad-file limit, a DataLoader timeout) is raised here, in
    order. Closing this generator early (a preemption break, an error in the consumer)
    stops the threads after the batch each is on; they are joined before the generator
    returns, so no thread and no DataLoader iterator outlives the epoch."""
    cuda = device.type == "cuda"
    if side is None:
        side = SideStream(device)
    # The consumer's stream (this runs in the consumer's thread, at the first next()), and
    # the side stream both threads work on (None off CUDA).
    stream = side(after=torch.cuda.current_stream(device) if cuda else None)

    def on_side(fn: Callable[[Any], Any], sync: bool, record: bool) -> Callable[[Any], Any]:
        """fn run on the side stream (as is off CUDA); (out, event) when `record`."""
        def run(batch):
            if stream is None:
                return (fn(batch), None) if record else fn(batch)
            if sync:
                stream.synchronize()  # the side stream only; training is not waited on
            with torch.cuda.stream(stream):
                out = fn(batch)
                if not record:
                    return out
                event = torch.cuda.Event()
                event.record(stream)
            return out, event
        return run

    def setup() -> None:
        if cuda:
            torch.cuda.set_device(device)  # the thread's current device is per thread

    if decode is not None:
        batches = threaded(batches, on_side(decode, sync_side_stream, False), depth=depth,
                           name="fastcls-decode", setup=setup)
    outs = threaded(batches, on_side(stage, sync_side_stream and decode is None, True), depth=depth,
                    name="fastcls-stage", setup=setup)
    try:
        for out, event in outs:
            if event is not None:
                main = torch.cuda.current_stream(device)
                main.wait_event(event)
                for t in out:
                    t.record_stream(main)
            yield out
    finally:
        outs.close()  # stops and joins the threads now, not when the generator is collected


class SourceLoader(LoaderBase):
    """A loader over a Source (fastcls.data.source): the decode paths' common base."""

    def __init__(self, source, spec: LoaderSpec):
        super().__init__(spec, source.order, source.classes, empty_classes=source.empty_classes,
                         excluded=source.excluded, dataset_size=source.num_samples)
        self.source = source
