"""The `dali` backend: NVIDIA DALI decodes, crops, resizes, flips and normalizes.

    data.backend: dali          # + data.dali.threads, hw_decoder_load, prefetch_queue_depth

One pipeline per loader for the whole run (a build preallocates GBs of device and pinned
memory and sets up nvJPEG and the hardware decoder: per epoch that would be paid again and
again). Its graph, per image:

    fn.external_source(DaliSource, parallel=True)   Python worker processes (data.workers):
        this rank's order for the epoch (the Source's), each sample read by position and
        screened by the Source (no non-image reaches the C++ decoder), its size read from
        the header, and the crop window and flip drawn by fastcls.data.sample: the other
        paths' crops, exactly
    -> fn.decoders.image_slice   decodes only that window (ROI decode; device "mixed" on a
        GPU: nvJPEG with `hw_decoder_load` of the images on the NVJPG hardware engines)
    -> fn.resize to the output size -> fn.crop_mirror_normalize (flip, ImageNet mean/std,
        HWC fp16/fp32 out)

Validation uses the same graph with the window of `Resize(val_resize)` + `CenterCrop`
(sample.val_box, as every path). Without a GPU the same graph runs on the CPU
(`device_id=None`, decoders on "cpu").

Epochs: the source maps DALI's epoch index to the run's epoch (the one the pipeline was
built for + DALI's count), so consecutive `set_epoch(e)` calls reuse the pipeline; only a
seek (`set_epoch(e, start_step > 0)`: a resume), a skipped epoch, an abandoned iteration or
a file DALI could not decode after all builds a new one, at that step. Because the windows
come from outside, a mid-epoch resume repeats the uninterrupted run's crops and flips.

Output contract (fastcls.data.base.Loader): images float16/float32 N×3×H×W on the loader's
device, a channels_last view of DALI's NHWC batch (no layout copy), normalized (x - mean) /
std in 0..255 units (cast to bf16 on the device under bf16 AMP: DALI has no bf16); labels
int64 N on the same device. On CUDA the pipeline's outputs are bound to torch's current
stream (no host synchronization per batch).

Any Source that reads by position (folders, list files, local tar shards with offsets in
their index) runs here; a stream (`pipe:` shards) cannot, since DALI hands a batch to
whichever worker is idle.

Undecodable files: screened ones never reach DALI; in training the source puts another
sample (the replacement rule of fastcls.data.sample, as every path) in their place, in
validation a placeholder whose row is dropped; each is counted in `loader.bad_files` and
the run stops past `data.max_bad_fraction`, as on `native`. A file that passes the screen
but that DALI cannot decode makes `run()` fail: the loader finds it (decoding the batches in
flight with a strict CPU decode), rebuilds the pipeline at the same step with the file
marked bad, and counts it. `python -m fastcls.tools.check DIR --exclude-out bad.txt` +
`data.exclude=bad.txt` removes such files before training.
"""
from __future__ import annotations

import io
import os
import signal
import threading
from typing import Iterator, Optional

import numpy as np
import torch

from .base import MEAN, STD, LoaderSpec, SourceLoader, epoch_size
from .sample import TRIES, Raw, candidates, header_size, strict_error, train_crop, val_box
from .source import DatasetError

INSTALL = ("pip install 'fastcls[dali]'  (= nvidia-dali-cuda120; CUDA 13: "
           "pip install nvidia-dali-cuda130)")


def _dali():
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise DatasetError(f"data.backend=dali: nvidia.dali is not installed ({e}); run: {INSTALL}") from None
    return fn, Pipeline, types, feed_ndarray


DEFAULT_THREADS = 4  # data.dali.threads=0
# nvJPEG's buffers sized up front per DALI thread for ImageNet's largest JPEGs, so they are not
# reallocated mid-epoch (the values of DALI's own ResNet-50 example): a pipeline preallocates
# threads x (DEVICE_PADDING device + 2 x HOST_PADDING pinned).
DEVICE_PADDING, HOST_PADDING = 211025920, 140544512


def dali_threads(threads: int, cores: Optional[int] = None) -> int:
    """DALI's CPU thread count for a pipeline: `data.dali.threads`, or for 0 DEFAULT_THREADS
    capped by `cores` (default: the cores this process may run on). Not data.workers: the
    paddings are per thread, and 16 workers' worth cost ~3.4 GB device + 4.5 GB pinned per
    pipeline (train, val and the clean-diagnosis loader each)."""
    if threads > 0:
        return threads
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, cores))


def padding_bytes(threads: int) -> tuple[int, int]:
    """(device, pinned host) bytes a GPU pipeline of `threads` threads preallocates for nvJPEG."""
    return threads * DEVICE_PADDING, threads * 2 * HOST_PADDING


def _seed(*parts: int) -> int:
    """A 31-bit DALI seed from integers (DALI seeds are int32, -1 means random)."""
    return int(np.random.default_rng(parts).integers(0, 2**31 - 1))


def _placeholder_jpeg() -> bytes:
    """A valid 8x8 grey JPEG: decoded in the slot of a bad validation file, its row dropped."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def _worker_signals(parent: int, pdeathsig: bool) -> None:
    """In DALI's Python workers: SLURM signals every process of a job step; preemption is the
    trainer's job (checkpoint, then shut the pipeline down), so SIGUSR1 is ignored and SIGTERM
    only arms a 30 s alarm (as the PIL path's DataLoader workers do). And the worker dies with
    its parent (workers.die_with_parent): DALI's workers do not watch it, and a SIGKILLed
    trainer left them running, re-parented to init."""
    from .workers import die_with_parent, term_later
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, term_later)
    die_with_parent(parent, pdeathsig=pdeathsig)


class DaliSource:
    """The parallel external source's callback over a Source: batch `iteration` of DALI
    epoch `epoch_idx` -> (encoded bytes, label, window anchor (x, y), window shape (w, h),
    flip, output size, keep, bad sample ids), one list entry per image. Stateless in DALI's
    sense (a pure function of the BatchInfo and what it was built with), so DALI's workers
    may compute batches in any order; it is pickled into them (spawn) or inherited (fork).
    `known_bad`: sample ids DALI could not decode, treated as bad."""

    def __init__(self, source, spec: LoaderSpec, *, base_epoch: int, first_step: int,
                 known_bad: dict[int, str]):
        d = spec.data
        self.source, self.order, self.train, self.seed = source, source.order, spec.train, spec.seed
        self.data, self.batch_size = d, spec.batch_size
        self.base_epoch, self.first_step, self.known_bad = base_epoch, first_step, dict(known_bad)
        self.random_access, self.num_samples = True, source.num_samples
        self.placeholder = _placeholder_jpeg()
        self._owner = os.getpid()
        # PR_SET_PDEATHSIG fires when the thread that started the worker ends: only safe when
        # the pipeline is built (its workers started) on the main thread, as the trainer does.
        self._pdeathsig = threading.current_thread() is threading.main_thread()
        self._signals_set = False

    def epoch_of(self, epoch_idx: int) -> int:
        return self.base_epoch + epoch_idx if self.train else 0

    def read(self, sid: int) -> Raw:
        """The Source's sample, or a failure for one DALI could not decode."""
        if sid in self.known_bad:
            return Raw(b"", -1, sid, self.source.name(sid), self.known_bad[sid])
        return self.source.read(sid)

    def __setstate__(self, state):
        """Unpickled in a spawned worker as it starts: its signal setup now, not at its first
        batch."""
        self.__dict__.update(state)
        self._worker_setup()

    def _worker_setup(self) -> None:
        if not self._signals_set and os.getpid() != self._owner:
            _worker_signals(self._owner, self._pdeathsig)
            self._signals_set = True

    def __call__(self, info):
        self._worker_setup()  # a forked worker: at its first batch
        epoch = self.epoch_of(info.epoch_idx)
        step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
        if step >= len(self.order):
            raise StopIteration
        size = epoch_size(self.data, self.train, epoch)
        rows = [self._sample(self.read(int(sid)), epoch, size) for sid in self.order.batch(epoch, step)]
        return tuple(list(col) for col in zip(*rows))

    def _row(self, raw: bytes, label: int, box, flip: bool, keep: bool, bad: list[int], size: int):
        x, y, w, h = box
        return (np.frombuffer(raw, dtype=np.uint8), np.array([label], dtype=np.int64),
                np.array([x, y], dtype=np.float32), np.array([w, h], dtype=np.float32),
                np.array(int(flip), dtype=np.int32), np.array(size, dtype=np.float32),
                np.array([int(keep)], dtype=np.uint8), np.array(bad, dtype=np.int64))

    def _sample(self, raw: Raw, epoch: int, size: int):
        """Training: the sample or its replacement, its window and flip from
        fastcls.data.sample; validation: Resize(val_resize) + CenterCrop as one window, a bad
        file becomes the placeholder, its row dropped by the loader (no image scored twice)."""
        d, bad = self.data, []
        for _, cand, rng in candidates(self, raw, epoch, self.seed, train=self.train):
            if cand.error is None:
                try:
                    w, h = header_size(cand.data)
                except Exception:  # an unreadable header: PIL raises many types
                    bad.append(cand.sid)
                    continue
                if not self.train:
                    return self._row(cand.data, cand.label, val_box(w, h, d.val_resize, size), False,
                                     True, bad, size)
                c = train_crop(w, h, rng, d.rrc.scale, d.rrc.ratio, d.hflip)
                return self._row(cand.data, cand.label, (c.left, c.top, c.width, c.height), c.flip,
                                 True, bad, size)
            bad.append(cand.sid)
        if self.train:
            raise DatasetError(f"{TRIES} files in a row failed to decode, e.g. samples {bad[:3]}")
        return self._row(self.placeholder, -1, (0, 0, 8, 8), False, False, bad, size)


def cuda_driver_initialized() -> bool:
    """Whether the CUDA driver is initialized in this process: DALI's own check (the one its
    worker pool makes before it refuses to fork, `nvidia.dali._multiproc.pool`), which asks the
    driver without initializing it (not `torch.cuda.is_available()`, which would). torch's
    lazy init counts too (it initializes the driver)."""
    try:
        from nvidia.dali import backend
        if backend.IsDriverInitialized():
            return True
    except (ImportError, AttributeError):
        pass
    return torch.cuda.is_initialized()


def start_method(gpu: bool, driver_initialized: bool) -> str:
    """How DALI starts its Python source workers: "spawn" when the pipeline is on the GPU
    (its build initializes CUDA) or the driver is already up in this process (e.g. a
    `torch.cuda.is_available()` call: DALI refuses to fork then), else "fork" (cheaper: the
    source is inherited, not pickled)."""
    return "spawn" if gpu or driver_initialized else "fork"


def build_pipeline(source: DaliSource, *, batch_size: int, num_threads: int,
                   device_id: Optional[int], seed: int, py_workers: int,
                   prefetch_queue_depth: int = 2, hw_decoder_load: float = 0.65,
                   out_fp16: bool = False, normalize: bool = True, build: bool = True,
                   py_start_method: Optional[str] = None):
    """The DALI graph over `source` (a DaliSource; see the module docstring).

    Outputs: images N×H×W×3 (HWC) float16/float32 (uint8-valued floats when
    `normalize=False`) on the GPU when `device_id` is not None; labels N×1 int64, keep N×1
    uint8, bad (ragged int64: the sample indices that failed in each slot) on the CPU.
    `build=False` only defines the graph (op names, arguments and devices are checked then;
    the GPU graph can be checked so on a machine without CUDA).

    Python workers start by fork on the CPU; on the GPU or with the CUDA driver already
    initialized in the process they spawn (`start_method`: DALI refuses to fork once the
    driver is up)."""
    fn, Pipeline, types, _ = _dali()
    gpu = device_id is not None
    if py_start_method is None:
        py_start_method = start_method(gpu, cuda_driver_initialized())
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=prefetch_queue_depth,
                    py_num_workers=max(1, py_workers), py_start_method=py_start_method)
    with pipe:
        jpegs, labels, anchor, shape, mirror, size, keep, bad = fn.external_source(
            source=source, num_outputs=8, batch=True, batch_info=True, parallel=True,
            prefetch_queue_depth=max(2, py_workers),  # a batch per worker in flight
            dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32,
                   types.FLOAT, types.UINT8, types.INT64],
            ndim=[1, 1, 1, 1, 0, 0, 1, 1])
        decode_kw = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
        if gpu:
            # Paddings per thread (DEVICE_PADDING, HOST_PADDING): num_threads x of each.
            decode_kw.update(hw_decoder_load=hw_decoder_load, device_memory_padding=DEVICE_PADDING,
                             host_memory_padding=HOST_PADDING)
        # ROI decode of the window; no EXIF rotation, so the header's size is the decoded one
        # and the pixels are the PIL path's.
        images = fn.decoders.image_slice(jpegs, anchor, shape, normalized_anchor=False,
                                         normalized_shape=False, adjust_orientation=False,
                                         **decode_kw)
        images = fn.resize(images, resize_x=size, resize_y=size,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT16 if out_fp16 else types.FLOAT, output_layout="HWC",
            mean=list(MEAN) if normalize else [0.0, 0.0, 0.0],
            std=list(STD) if normalize else [1.0, 1.0, 1.0], mirror=mirror)
        pipe.set_outputs(images, labels, keep, bad)
    if build:
        pipe.build()
    return pipe


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without blocking the host: pinned first on CUDA (a
    pageable host-to-device copy synchronizes)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DaliLoader(SourceLoader):
    """The data interface (fastcls.data.base.Loader) over one DALI pipeline; see the module
    docstring. `builds` counts the pipelines built (one for a plain run)."""

    bad_files_fix = ("remove them (python -m fastcls.tools.check DIR --exclude-out bad.txt, "
                     "then data.exclude=bad.txt)")

    def __init__(self, source, spec: LoaderSpec):
        _dali()  # fail at start, with the pip command, when DALI is missing
        if not source.random_access:
            raise DatasetError(f"{spec.key}: data.backend=dali reads samples by position: folders, "
                               f"list files, or local tar shards with offsets in their index (python "
                               f"-m fastcls.tools.convert --to wds writes them); stream pipe:/remote "
                               f"shards with data.backend=native")
        super().__init__(source, spec)
        d = spec.data
        self.batch_size, self.workers = spec.batch_size, d.workers
        self.num_threads = dali_threads(d.dali.threads)  # DALI CPU threads (decode, resize)
        if spec.device.type == "cuda":
            self.device_id: Optional[int] = spec.device.index if spec.device.index is not None \
                else torch.cuda.current_device()
        elif spec.device.type == "cpu":
            self.device_id = None
        else:
            raise DatasetError(f"data.backend=dali runs on cuda or cpu, not {spec.device.type}")
        # DALI has no bfloat16: fp16 out of the graph (half the bytes of fp32), cast on the device.
        self.out_dtype = torch.float16 if spec.dtype in (torch.float16, torch.bfloat16) else torch.float32
        self.rank, self.seed = spec.rank, spec.seed
        self.prefetch_queue_depth, self.hw_decoder_load = d.dali.prefetch_queue_depth, d.dali.hw_decoder_load
        self.known_bad: dict[int, str] = {}  # sample index -> reason, for the whole run
        self.builds = 0
        self._pipe = None
        self._pipe_epoch = 0         # the run's epoch the pipeline is in (or ended)
        self._pipe_state = "none"    # "fresh": at the start of _pipe_epoch (+ _pipe_step);
        self._pipe_step = 0          # "ended": every batch of it taken; "open": mid-epoch

    # ------------------------------------------------------------------ pipelines

    def close(self) -> None:
        """The pipeline (its memory, threads and Python source workers) goes now; the next
        iteration builds a new one."""
        if self._pipe is not None:
            self._pipe, self._pipe_state = None, "none"
            import gc
            gc.collect()  # DALI tears a pipeline down in its finalizers, which gc also runs

    def _build(self, epoch: int, step: int) -> None:
        """A new pipeline at batch `step` of `epoch` (the old one, if any, shut down first)."""
        self.close()  # the old pipeline's memory and workers go before the new ones come
        self._pipe = build_pipeline(
            self._source(epoch, step), batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self.device_id, seed=_seed(self.seed, self.rank, epoch, step),
            py_workers=self.workers, prefetch_queue_depth=self.prefetch_queue_depth,
            hw_decoder_load=self.hw_decoder_load, out_fp16=self.out_dtype == torch.float16)
        self.builds += 1
        self._pipe_epoch, self._pipe_step, self._pipe_state = epoch, step, "fresh"

    def _source(self, epoch: int, step: int) -> DaliSource:
        return DaliSource(self.source, self.spec, base_epoch=epoch, first_step=step,
                          known_bad=self.known_bad)

    def _pipeline_at(self, epoch: int, step: int) -> None:
        """A pipeline positioned at batch `step` of `epoch`: the current one when it is there
        (or at the end of the epoch before: DALI's next epoch is this one), else a new one."""
        if self._pipe is not None:
            if self._pipe_state == "fresh" and (self._pipe_epoch, self._pipe_step) == (epoch, step):
                return
            follows = epoch == self._pipe_epoch + 1 if self.train else True
            if self._pipe_state == "ended" and step == 0 and follows:
                try:  # the last batch is taken: DALI now reports the end of its epoch
                    self._pipe.run()
                    raise AssertionError("DALI yielded more batches than the epoch has")
                except StopIteration:
                    self._pipe.reset()
                self._pipe_epoch, self._pipe_step, self._pipe_state = epoch, 0, "fresh"
                return
        self._build(epoch, step)

    def _find_bad(self, order: np.ndarray, step: int) -> dict[int, str]:
        """Sample ids DALI could not decode: those of the batches in flight that a strict CPU
        decode refuses, not known bad yet."""
        lo = step * self.batch_size
        depth = self.prefetch_queue_depth + max(2, self.workers) + 2  # executor + source queues
        found = {}
        for i in order[lo:lo + depth * self.batch_size].tolist():
            why = None if i in self.known_bad or i in found else self._strict(i)
            if why is not None:
                found[i] = f"DALI could not decode it: {why}"
        return found

    def _strict(self, sid: int):
        """Why sample `sid` cannot be used (its read, screen or a strict CPU decode), or None."""
        raw = self.source.read(sid)
        return raw.error or strict_error(raw.data)

    def _reason(self, sid: int) -> str:
        return self.known_bad.get(sid) or self._strict(sid) or "undecodable"

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, _, _, feed_ndarray = _dali()
        self.bad_files = []
        epoch, step = self.order.epoch, self.order.start_step
        self.order.start_step = 0  # a seek applies to one iteration only
        order, steps = self.order.ids(epoch), len(self)
        if step >= steps:
            return
        self._pipeline_at(epoch, step)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while step < steps:
            self._pipe_state = "open"
            try:
                images, labels, keep, bad = self._pipe.run(stream) if stream is not None \
                    else self._pipe.run()
            except StopIteration:
                raise AssertionError(f"DALI's epoch ended at step {step} of {steps}") from None
            except RuntimeError as e:
                found = self._find_bad(order, step)
                if not found:
                    paths = [self.source.name(i) for i in order[step * self.batch_size:][:3]]
                    raise DatasetError(
                        f"DALI failed at step {step} and no undecodable file was found among "
                        f"the batches in flight (first: {paths}); run python -m "
                        f"fastcls.tools.check --strict on the data. DALI said: "
                        f"{str(e).strip()[-800:]}") from None
                self.known_bad.update(found)  # counted when the rebuilt pipeline meets them
                self._build(epoch, step)  # at the same step, the files marked bad
                continue
            for row in bad:
                self._account([f"{self.source.name(i)}: {self._reason(i)}" for i in np.array(row).tolist()])
            step += 1
            if step == steps:
                self._pipe_state = "ended"
            yield self._to_torch(images, labels, keep, feed_ndarray, stream)

    def _to_torch(self, images, labels, keep, feed_ndarray, stream):
        """DALI NHWC batch -> (N×3×H×W channels_last view, int64 N), placeholder rows dropped."""
        y = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1))
        kept = np.array(keep.as_tensor()).reshape(-1).astype(bool)
        shape = images.as_tensor().shape()
        hwc = torch.empty(tuple(shape), dtype=self.out_dtype, device=self.device)
        feed_ndarray(images.as_tensor(), hwc, cuda_stream=stream)  # on torch's stream: no host sync
        if not kept.all():  # validation placeholders: their rows go
            sel = torch.from_numpy(np.flatnonzero(kept))
            hwc, y = hwc.index_select(0, _to_device(sel, self.device)), y[sel]
        x = hwc.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW = channels_last
        if x.dtype != self.dtype:
            x = x.to(self.dtype, memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)
