"""The `dali` backend: NVIDIA DALI reads, decodes, crops, flips and normalizes.

    data.backend: dali          # + data.dali.hw_decoder_load, data.dali.prefetch_queue_depth

Training graph, per image: `fn.readers.file` (C++ reader threads) -> `fn.decoders.image_random_crop`
(device "mixed" on a GPU: nvJPEG with `hw_decoder_load` of the images on the NVJPG hardware
engines; it decodes only the random-resized-crop window, `random_area` = `data.rrc.scale`,
`random_aspect_ratio` = `data.rrc.ratio`) -> `fn.resize` to `data.image_size` ->
`fn.crop_mirror_normalize` (flip with probability `data.hflip`, ImageNet mean/std, HWC out).
Validation: decode, shorter side to `data.val_resize`, center crop `data.image_size`.
Without a GPU the same graph runs on the CPU (`device_id=None`, decoders on "cpu").

Output contract (fastcls.data.base.Loader): images float16/float32 N×3×H×W on the loader's device, a
channels_last view of DALI's NHWC batch (no layout copy), normalized (x - mean) / std in
0..255 units; labels int64 N on the same device.

Order and sharding: the reader is not given `shard_id`/`num_shards`/`random_shuffle`.
Its shuffle is a buffer shuffle (not a permutation of the epoch), and its sharding rotates
shards between epochs and cannot start an epoch at an arbitrary step. Instead each epoch
gets its own pipeline whose reader `files=` list is this rank's order from
`ShardBatchSampler`, the sampler the native backend uses: identical epochs, shards,
dropped partial batch and `set_epoch(epoch, start_step)` seek as `native`, exactly. A
pipeline costs milliseconds to build on the CPU; the random ops (crop, flip) are seeded from
(train.seed, rank, epoch, start_step), so an epoch's crops are reproducible and a resume at
an epoch boundary sees the crops the uninterrupted run saw (a mid-epoch resume sees the same
images in the same order, with other crops). Validation keeps its partial last batch: the
reader pads it (`pad_last_batch=True` repeats the last file) and the padding is dropped here.

Undecodable files: DALI raises on them and the pipeline is dead after that. The loader
catches the error, finds the bad file(s) (the path DALI names, else by decoding the batches
in flight with `fastcls.data.check.check_file`), and rebuilds the pipeline from the step it
was at with the bad file replaced in the list: in training by another sample (batches stay
full), in validation by a placeholder whose output row is dropped (no image scored twice).
Known bad files are replaced up front in later epochs. Like `native`, they are counted per
epoch in `loader.bad_files` and the run stops with their names once more than
`data.max_bad_fraction` of the epoch's images are bad. `python -m fastcls.data.check DIR
--exclude-out bad.txt` + `data.exclude=bad.txt` removes them before training instead.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

import numpy as np
import torch

from .base import MEAN, STD, LoaderBase, LoaderSpec
from .check import check_file
from .folder import DatasetError, FolderIndex

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


def _seed(*parts: int) -> int:
    """A 31-bit DALI seed from integers (DALI seeds are int32, -1 means random)."""
    return int(np.random.default_rng(parts).integers(0, 2**31 - 1))


def build_pipeline(files: list[str], labels: list[int], *, train: bool, batch_size: int,
                   image_size: int, val_resize: int, scale, ratio, hflip: float,
                   num_threads: int, device_id: Optional[int], seed: int,
                   prefetch_queue_depth: int = 2, hw_decoder_load: float = 0.65,
                   out_fp16: bool = False, normalize: bool = True, build: bool = True):
    """The DALI graph over `files` in the given order (no shuffling, no sharding here).

    Outputs: images N×H×W×3 (HWC) float16/float32 (uint8-valued floats when
    `normalize=False`), labels N×1 int64; on the GPU when `device_id` is not None.
    `build=False` only defines the graph (op names, arguments and devices are checked then;
    the GPU graph can be checked so on a machine without CUDA)."""
    fn, Pipeline, types, _ = _dali()
    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed, prefetch_queue_depth=prefetch_queue_depth)
    with pipe:
        jpegs, labs = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                      pad_last_batch=True, name="reader")
        decode_kw = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
        if gpu:
            # Paddings: nvJPEG's buffers sized up front for ImageNet's largest JPEGs, so they are
            # not reallocated mid-epoch (the values of DALI's own ResNet-50 example).
            decode_kw.update(hw_decoder_load=hw_decoder_load, device_memory_padding=211025920,
                             host_memory_padding=140544512)
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, random_area=list(scale), random_aspect_ratio=list(ratio),
                num_attempts=10, **decode_kw)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=hflip) if hflip > 0 else 0
        else:
            images = fn.decoders.image(jpegs, **decode_kw)
            images = fn.resize(images, resize_shorter=val_resize,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT16 if out_fp16 else types.FLOAT, output_layout="HWC",
            crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5,
            mean=list(MEAN) if normalize else [0.0, 0.0, 0.0],
            std=list(STD) if normalize else [1.0, 1.0, 1.0], mirror=mirror)
        labs = fn.cast(labs, dtype=types.INT64)
        if gpu:
            labs = labs.gpu()
        pipe.set_outputs(images, labs)
    if build:
        pipe.build()
    return pipe


class DaliLoader(LoaderBase):
    """The data interface (fastcls.data.base.Loader) over DALI pipelines; see the module docstring."""

    bad_files_fix = ("remove them (python -m fastcls.data.check DIR --exclude-out bad.txt, "
                     "then data.exclude=bad.txt)")

    def __init__(self, index: FolderIndex, spec: LoaderSpec):
        _dali()  # fail at start, with the pip command, when DALI is missing
        d = spec.data
        super().__init__(len(index.samples), spec)
        self.classes, self.empty_classes, self.excluded = index.classes, index.empty_classes, index.excluded
        self.samples = index.samples
        self.train, self.batch_size, self.image_size = spec.train, spec.batch_size, d.image_size
        self.val_resize, self.scale, self.ratio, self.hflip = d.val_resize, d.rrc.scale, d.rrc.ratio, d.hflip
        self.num_threads = max(1, d.workers)  # DALI CPU threads (decode on CPU, reader, resize)
        self.device, self.dtype = spec.device, spec.dtype
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

    # ------------------------------------------------------------------ file lists

    def _replacement(self, idx: int) -> int:
        """A good sample standing in for bad sample `idx` (training), seeded by (seed, epoch, idx)."""
        rng = np.random.default_rng((self.seed, self.sampler.epoch, idx, 1))
        for _ in range(100):
            j = int(rng.integers(self.dataset_size))
            if j not in self.known_bad:
                return j
        raise DatasetError(f"data.train: almost every file is undecodable, e.g. "
                           f"{list(self.known_bad.items())[:5]}")

    def _placeholder(self) -> int:
        for j in range(self.dataset_size):
            if j not in self.known_bad:
                return j
        raise DatasetError(f"no decodable file at all, e.g. {list(self.known_bad.items())[:5]}")

    def _lists(self, order: np.ndarray) -> tuple[list[str], list[int], np.ndarray]:
        """(files, labels, keep mask) for the reader; known bad files are replaced."""
        keep = np.ones(len(order), dtype=bool)
        files, labels = [], []
        for k, idx in enumerate(order.tolist()):
            if idx in self.known_bad:
                if self.train:
                    idx = self._replacement(idx)
                else:
                    keep[k] = False
                    idx = self._placeholder()  # read and decoded, its output row dropped
            path, label = self.samples[idx]
            files.append(path)
            labels.append(label)
        return files, labels, keep

    def _count_known_bad(self, order: np.ndarray) -> None:
        """bad_files = the known bad files in this iteration's order; stop past the limit."""
        self.bad_files = [f"{self.samples[i][0]}: {self.known_bad[i]}" for i in order.tolist()
                          if i in self.known_bad]
        self._check_bad_limit()

    def _find_bad(self, error: Exception, order: np.ndarray, step: int) -> dict[int, str]:
        """Sample indices that made DALI fail: the path its message names, else the files of
        the batches in flight that do not decode (PIL + libjpeg-turbo)."""
        text = str(error)
        pos = {self.samples[i][0]: i for i in order.tolist()}
        named = {pos[p]: f"DALI: {line.strip()}" for line in text.splitlines()
                 for p in re.findall(r"(?:sample #\d+ : |File mapping failed: )(\S+)", line)
                 if p in pos and pos[p] not in self.known_bad}
        if named:
            return named
        lo = step * self.batch_size
        hi = lo + (self.prefetch_queue_depth + 3) * self.batch_size  # pipeline + reader queues
        found = {}
        for i in order[lo:hi].tolist():
            if i in self.known_bad or i in found:
                continue
            why = check_file(self.samples[i][0], strict=True)
            if why is not None:
                found[i] = why
        return found

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, _, _, feed_ndarray = _dali()
        order = self.sampler.indices()
        steps, step = len(self), self.sampler.start_step
        self.sampler.start_step = 0  # a seek applies to one iteration only
        epoch_order = order[step * self.batch_size:]  # what this iteration yields
        self._count_known_bad(epoch_order)
        while step < steps:
            files, labels, keep = self._lists(order)
            lo = step * self.batch_size
            pipe = build_pipeline(
                files[lo:], labels[lo:], train=self.train, batch_size=self.batch_size,
                image_size=self.image_size, val_resize=self.val_resize, scale=self.scale,
                ratio=self.ratio, hflip=self.hflip, num_threads=self.num_threads,
                device_id=self.device_id,
                seed=_seed(self.seed, self.rank, self.sampler.epoch, step, len(self.known_bad)),
                prefetch_queue_depth=self.prefetch_queue_depth,
                hw_decoder_load=self.hw_decoder_load, out_fp16=self.out_dtype == torch.float16)
            try:
                while step < steps:
                    try:
                        images, labs = pipe.run()
                    except RuntimeError as e:
                        found = self._find_bad(e, order, step)
                        if not found:
                            paths = [self.samples[i][0] for i in order[lo:lo + self.batch_size]]
                            raise DatasetError(
                                f"DALI failed at step {step} and no undecodable file was found "
                                f"among the batches in flight (first: {paths[:3]}); run python -m "
                                f"fastcls.data.check --strict on the folder. DALI said: "
                                f"{str(e).strip()[-800:]}") from None
                        self.known_bad.update(found)
                        self._count_known_bad(epoch_order)  # counted once per epoch, as native does
                        break  # rebuild from `step` with the bad files replaced
                    yield self._to_torch(images, labs, keep[step * self.batch_size:
                                                           (step + 1) * self.batch_size],
                                         feed_ndarray)
                    step += 1
            finally:
                del pipe

    def _to_torch(self, images, labs, keep: np.ndarray, feed_ndarray):
        """DALI NHWC batch -> (N×3×H×W channels_last view, int64 N), padding/bad rows dropped."""
        n = len(keep)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        hwc = torch.empty((len(images), self.image_size, self.image_size, 3),
                          dtype=self.out_dtype, device=self.device)
        feed_ndarray(images.as_tensor(), hwc, cuda_stream=stream)
        y = torch.empty((len(labs), 1), dtype=torch.int64, device=self.device)
        feed_ndarray(labs.as_tensor(), y, cuda_stream=stream)
        hwc, y = hwc[:n], y[:n, 0]  # the reader padded the last (validation) batch
        if not keep.all():
            sel = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
            hwc, y = hwc.index_select(0, sel), y.index_select(0, sel)
        x = hwc.permute(0, 3, 1, 2)  # NHWC storage viewed as NCHW = channels_last
        if x.dtype != self.dtype:
            x = x.to(self.dtype, memory_format=torch.channels_last)
        return x, y
