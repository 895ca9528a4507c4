"""The batched decode path (`data.backend: native`, `data.native_decode: batched`, the
default on CUDA), over any Source.

DataLoader workers read the batch's bytes from the Source (screened: only image signatures
reach a decoder), read each image's size from its header, draw its crop and flip
(fastcls.data.sample: the same boxes as every path) and build the crop kernel's parameter
rows (`kernel_rows`: box, window, flip; evaluation: torchvision's Resize + CenterCrop box
from the header size), and hand over one buffer and a few numpy arrays per batch (`Fed`).
Two background threads of the main process then, per batch:

1. (`_decode`) decode the batch in one call (`data.decoder`): nvImageCodec when installed
   (on CUDA the hardware JPEG engines + CUDA decoder, on CPU its CPU-only backend),
   otherwise `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg-turbo
   on CPU); grayscale and CMYK come out RGB; a file the batch decoder refuses (PNG named
   .jpg, a JPEG flavour nvJPEG lacks) is decoded alone on the CPU (torchvision, then PIL)
   and moved to the device;
2. (`_finish`, while the first thread decodes the next batch) check each decoded size
   against the header's, copy the workers' rows as they are and run ONE
   fused kernel for the ragged batch (kernels/resized_crop.py: crop -> bilinear resize,
   antialias per `data.antialias` -> flip -> normalize -> cast -> channels_last): Triton on
   CUDA, reading the decoded images where they are (`pack_in_place`: no copy of the
   batch), the torch reference on CPU over one packed buffer. Only an image the decoder
   refused or decoded at another size takes a per-image path (`_mend`: replaced in training,
   dropped in evaluation).

Up to two batches are staged ahead (on CUDA on the loader's side stream), so the decoders'
host waits overlap the training steps instead of holding the training thread, and the
decode of batch k + 1 overlaps the packing and kernel of batch k. `benchmarks/host_feed.py`
measures the main process's and the workers' cost per image with the decoder and kernel
stubbed. A file that does not decode is counted in
`bad_files` (limit `data.max_bad_fraction`) and replaced by another sample in training,
dropped in evaluation, as in the PIL path.

Output contract (fastcls.data.base.Loader): images `dtype` N×3×S×S channels_last on
`device`, ImageNet normalized; labels int64 on `device`.
"""
from __future__ import annotations

import collections
import importlib.util
import math
import os
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..config import ANTIALIAS_MODES
from .base import MEAN, STD, LoaderSpec, SourceLoader, epoch_size, staged
from .sample import TRIES, Crop, Raw, candidates, header_size, jpeg_needs_cpu, train_crop, val_box
from .source import DatasetError
from .workers import batches_with_timeout, to_rgb, worker_loader

# data.antialias -> the kernel's `antialias_above` (source/output scale above which the
# bilinear filter widens like torchvision antialias=True).
ANTIALIAS_ABOVE = {"on": 1.0, "auto": 2.0, "off": math.inf}
assert set(ANTIALIAS_ABOVE) == set(ANTIALIAS_MODES)


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def decode_one_cpu(data: torch.Tensor) -> torch.Tensor:
    """Any image file's bytes -> uint8 3×H×W RGB on the CPU (torchvision, PIL for the rest:
    BMP, TIFF, ...). Raises on undecodable data."""
    from torchvision.io import ImageReadMode, decode_image
    if data.numel() == 0:
        raise ValueError("empty file")
    try:
        img = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        import io

        from PIL import Image
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return torch.from_numpy(np.asarray(to_rgb(im)).copy()).permute(2, 0, 1).contiguous()
    if img.dtype == torch.uint16:  # 16-bit PNG: torchvision keeps 16 bits; keep the high byte
        img = (img.to(torch.int32) >> 8).to(torch.uint8)  # (uint16 has few CPU kernels)
    return img


def resolve_decoder(name: str) -> str:
    """data.decoder -> "nvimgcodec" | "torchvision" (auto: nvImageCodec when installed)."""
    have = importlib.util.find_spec("nvidia") is not None and \
        importlib.util.find_spec("nvidia.nvimgcodec") is not None
    if name == "nvimgcodec" and not have:
        raise DatasetError("data.decoder=nvimgcodec: nvImageCodec is not installed; run: "
                           "pip install 'fastcls[nvimgcodec]'  (= nvidia-nvimgcodec-cu12 + nvidia-nvjpeg-cu12; "
                           "CUDA 13: pip install 'fastcls[nvimgcodec-cu13]')")
    if name == "auto":
        return "nvimgcodec" if have else "torchvision"
    return name


def cpu_threads_for_decoder() -> int:
    """nvImageCodec's CPU threads for this rank: half of the rank's share of the cores (the
    other half runs the DataLoader workers and the training thread), at most 8. Its default,
    one thread per core in every rank, oversubscribes a node (8 ranks x 128 threads)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, share // 2))


class NvImageCodecDecoder:
    """nvImageCodec batch decode: on CUDA the hardware JPEG engines (A100/H100/H200 NVJPG)
    plus the CUDA decoder; on CPU its CPU-only backend (libjpeg-turbo, PNG, BMP, ...).

    __call__(list of uint8 1-D CPU byte tensors) -> list of uint8 3×H×W RGB views (HWC
    memory, no copy) on `device`, None where nvImageCodec could not decode."""

    def __init__(self, device: torch.device):
        from nvidia import nvimgcodec
        self.nv, self.device = nvimgcodec, device
        threads = cpu_threads_for_decoder()
        if device.type == "cuda":
            self.decoder = nvimgcodec.Decoder(device_id=device.index if device.index is not None
                                              else torch.cuda.current_device(),
                                              max_num_cpu_threads=threads)
        else:
            self.decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                              max_num_cpu_threads=threads,
                                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        # No EXIF rotation: the same pixels as torchvision.io and the PIL path.
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False,
                                              color_spec=nvimgcodec.ColorSpec.SRGB,
                                              sample_format=nvimgcodec.SampleFormat.I_RGB)
        # Host images (a codec decoded on the CPU) copied to the GPU with non_blocking=True:
        # nvImageCodec frees their (pinned) buffers when they are dropped, so each batch's
        # stay referenced until an event after their copies has passed.
        self._in_flight: collections.deque = collections.deque()

    def __call__(self, datas: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if cuda else None
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()
        outs = self.decoder.decode([d.numpy() for d in datas], params=self.params,
                                   cuda_stream=stream.cuda_stream if cuda else 0)
        one_output_per_input(outs, len(datas))
        images: list[Optional[torch.Tensor]] = []
        host = []
        for o in outs:
            if o is None:
                images.append(None)
            elif o.buffer_kind == self.nv.ImageBufferKind.STRIDED_DEVICE:
                images.append(torch.from_dlpack(o).permute(2, 0, 1))
            else:  # host image (CPU backend, or a codec without a GPU decoder)
                t = torch.from_numpy(np.asarray(o))  # holds `o` (its buffer) alive
                if cuda:
                    host.append(t)
                images.append(t.to(self.device, non_blocking=True).permute(2, 0, 1))
        if host:
            event = torch.cuda.Event()
            event.record(stream)
            self._in_flight.append((event, host))
        return images


def one_output_per_input(outs, n: int) -> None:
    """nvImageCodec's decode must return one entry per input, None for a failure: releases
    before 0.9 dropped the failed images from the list, which would pair every later image
    with the wrong label, silently. A DatasetError otherwise (setup.py pins >= 0.9)."""
    if len(outs) != n:
        raise DatasetError(f"nvImageCodec returned {len(outs)} images for {n} inputs: an older "
                           f"release drops failed images, which would shift the labels; "
                           f"pip install 'nvidia-nvimgcodec-cu12>=0.9' (or -cu13)")


def decode_batch(datas: list[torch.Tensor], device: torch.device,
                 nvdecoder: Optional[NvImageCodecDecoder] = None,
                 fallbacks: Optional[collections.Counter] = None,
                 cpu_only: Optional[Sequence[bool]] = None
                 ) -> tuple[list[Optional[torch.Tensor]], list[Optional[str]]]:
    """Decode file bytes (CPU uint8 1-D) -> (uint8 3×H×W RGB on `device` or None, error or None).
    `fallbacks` counts, by reason, the images the one batch call did not decode (each then
    decoded alone, on the CPU where the GPU cannot): a decoder build that falls back for
    every image would cut speed 10x, so the loader reports the count every epoch.

    With `nvdecoder`, nvImageCodec decodes the whole batch (any format it knows). Else JPEGs
    go through one batched torchvision `decode_jpeg` call, except those `cpu_only` marks
    (sample.jpeg_needs_cpu, computed by the workers: CMYK and other JPEGs nvJPEG refuses,
    decoded on the CPU without trying the GPU); if the call raises (one bad file fails the
    whole call), they are retried one by one so only the bad ones are lost. Whatever is left
    is decoded alone on the CPU (torchvision, then PIL) and moved to the device."""
    from torchvision.io import ImageReadMode, decode_jpeg
    images: list[Optional[torch.Tensor]] = [None] * len(datas)
    errors: list[Optional[str]] = [None] * len(datas)
    if not datas:
        return images, errors
    fallbacks = collections.Counter() if fallbacks is None else fallbacks
    if nvdecoder is not None:
        images = nvdecoder(datas)
        alone = [i for i, im in enumerate(images) if im is None]
        fallbacks["nvImageCodec returned no image"] += len(alone)
    else:
        is_jpeg = [_is_jpeg(d) for d in datas]
        cpu = cpu_only if cpu_only is not None else [False] * len(datas)
        jpeg = [i for i, j in enumerate(is_jpeg) if j and not cpu[i]]
        alone = [i for i, j in enumerate(is_jpeg) if not j]
        fallbacks["not a JPEG (decode_jpeg reads only JPEG)"] += len(alone)
        routed = [i for i, j in enumerate(is_jpeg) if j and cpu[i]]
        fallbacks["CMYK or other JPEG nvJPEG refuses (decoded on the CPU)"] += len(routed)
        alone += routed
        if jpeg:
            try:
                out = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
                for i, im in zip(jpeg, out):
                    images[i] = im
            except RuntimeError:
                alone += jpeg  # rare: find the bad file(s) one at a time
                fallbacks["the batch decode_jpeg call failed"] += len(jpeg)
    for i in alone:
        try:
            if nvdecoder is None and device.type == "cuda" and _is_jpeg(datas[i]) and \
                    not (cpu_only is not None and cpu_only[i]):
                try:
                    images[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device)
                    continue
                except RuntimeError:
                    pass  # e.g. a JPEG flavour nvJPEG lacks: the CPU decoder may still read it
            images[i] = decode_one_cpu(datas[i]).to(device, non_blocking=True)
        except Exception as e:  # any undecodable file: decoders raise many types
            errors[i] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return images, errors


class ByteBatch:
    """In a worker: batch g of `epoch` of the source -> a `Fed` batch: one uint8 tensor of
    the kept samples' bytes back to back, their offsets, and per sample as numpy arrays
    (pickled, no file descriptor each) the label, slot sample id, attempt, name, and the
    crop kernel's parameter rows for the epoch's output size (`kernel_rows`: box, window,
    flip), the header's (height, width), and whether a JPEG must stay out of a GPU batch
    decode (`sample.jpeg_needs_cpu`); plus ["name: reason" of the failures].

    The worker draws every crop (training: `train_crop`; evaluation: `val_box` from the
    header size) and builds the rows, so the main process runs one decode call, one copy of
    the rows and one kernel per batch with no per-image Python beyond the decoder's API.

    One tensor per batch: a DataLoader worker hands each returned tensor over through a
    file descriptor of its own, so a tensor per image would exhaust `ulimit -n` (1024) at
    batch 256 x prefetch (and costs 3x the time). A sample that fails screening or whose
    header does not read is replaced here in training (the replacement rule) and dropped in
    evaluation, so the main process only meets what the batch decoder itself refuses."""

    def __init__(self, source, spec: LoaderSpec):
        d = spec.data
        self.source, self.train, self.seed, self.data = source, spec.train, spec.seed, d
        self.scale, self.ratio, self.hflip = d.rrc.scale, d.rrc.ratio, d.hflip

    def __call__(self, epoch: int, g: int) -> "Fed":
        batch = self.source.read_batch(epoch, g)
        keep, errors = [], []
        for raw in batch:
            tried = []
            for k, cand, rng in candidates(self.source, raw, epoch, self.seed, train=self.train, batch=batch):
                why = cand.error
                if why is None:
                    try:
                        w, h = header_size(cand.data)
                        crop = train_crop(w, h, rng, self.scale, self.ratio, self.hflip) if self.train \
                            else Crop(0, 0, h, w, False, h, w)
                        keep.append((cand, raw.sid, k, crop))
                        break
                    except Exception as e:  # an unreadable header: PIL raises many types
                        why = f"{type(e).__name__}: {e}"
                tried.append(f"{cand.name}: {why}")
            else:
                if self.train:
                    raise DatasetError(f"{TRIES} samples in a row failed to decode: {tried}")
            errors += tried
        sizes = [len(c.data) for c, *_ in keep]
        joined = b"".join(c.data for c, *_ in keep)
        buf = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        crops = [c for *_, c in keep]
        box, window, flip = kernel_rows(crops, self.train, self.data.val_resize,
                                        epoch_size(self.data, self.train, epoch))
        return Fed(buf, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]),
                   np.array([c.label for c, *_ in keep], np.int64), [sid for _, sid, _, _ in keep],
                   [k for *_, k, _ in keep], [c.name for c, *_ in keep], box, window, flip,
                   np.array([(c.image_height, c.image_width) for c in crops], np.int64).reshape(-1, 2),
                   np.array([jpeg_needs_cpu(c.data) for c, *_ in keep], bool), errors)


class Fed(NamedTuple):
    """What a byte worker hands the main process for one batch (see ByteBatch)."""
    buf: torch.Tensor
    offsets: np.ndarray
    labels: np.ndarray
    slots: list
    attempts: list
    names: list
    box: np.ndarray
    window: np.ndarray
    flip: np.ndarray
    hw: np.ndarray
    cpu_only: np.ndarray
    errors: list


def kernel_rows(crops: Sequence[Crop], train: bool, val_resize: int, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crop kernel's parameter rows (kernels/resized_crop.py) of `crops` for an output
    of size x size: box (float32 N×4: top, left, source pixels per output pixel in y, x),
    window (int64 N×4: the source rows and columns the filter may read) and flip (uint8 N).
    Training: the drawn crop, read only inside it. Evaluation (`crops` carry only the image
    size): torchvision's Resize(val_resize) + CenterCrop(size) box, the whole image readable."""
    n = len(crops)
    c = np.array([tuple(x) for x in crops], np.float64).reshape(n, 7)
    top, left, ch, cw, flip, h, w = c.T
    if not train:
        boxes = [val_box(int(wi), int(hi), val_resize, size) for hi, wi in zip(h, w)]
        left, top, cw, ch = np.array(boxes, np.float64).reshape(n, 4).T
        window = np.stack([np.zeros(n), h, np.zeros(n), w], 1)
    else:
        window = np.stack([top, top + ch, left, left + cw], 1)
    box = np.stack([top, left, ch / size, cw / size], 1).astype(np.float32)
    return box, window.astype(np.int64), flip.astype(np.uint8)


class BatchedLoader(SourceLoader):
    """The data interface (fastcls.data.base.Loader): byte-reading workers + batched decode
    + one fused crop/resize/normalize kernel per batch. The same boxes as the PIL path for
    the same seed."""

    def __init__(self, source, spec: LoaderSpec):
        super().__init__(source, spec)
        d = spec.data
        self.seed, self.val_resize = spec.seed, d.val_resize
        self.antialias_above = ANTIALIAS_ABOVE[d.antialias]
        self.decoder = resolve_decoder(d.decoder)  # "nvimgcodec" | "torchvision"
        self._nv: Optional[NvImageCodecDecoder] = None  # created on first use, in the staging thread
        self.fallbacks: collections.Counter = collections.Counter()
        self.worker = ByteBatch(source, spec)
        self.loader = worker_loader(self.worker, self.order, d.workers, d.timeout)
        self.timeout = d.timeout if d.workers > 0 else 0

    def _nvdecoder(self) -> Optional[NvImageCodecDecoder]:
        if self.decoder == "nvimgcodec" and self._nv is None:
            self._nv = NvImageCodecDecoder(self.device)
        return self._nv

    def _replace(self, slot: Raw, attempt: int, epoch: int, batch: list[Raw]):
        """Training: the next replacement of a sample the batch decoder refused (rare path:
        read, screened and decoded alone here, on the CPU, then moved to the device: this
        runs in the kernel's thread while the decode thread uses the batch decoder on the
        next batch, and a decoder object is not shared between threads) -> (image, label,
        crop)."""
        tried = []
        for _, cand, rng in candidates(self.source, slot, epoch, self.seed, train=True, batch=batch,
                                       start=attempt + 1):
            why = cand.error
            if why is None:
                img = None
                try:
                    img = decode_one_cpu(torch.frombuffer(bytearray(cand.data), dtype=torch.uint8))
                    img = img.to(self.device, non_blocking=True)
                except Exception as e:  # any undecodable file: decoders raise many types
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if img is not None:
                    d = self.data
                    return img, cand.label, train_crop(img.shape[2], img.shape[1], rng, d.rrc.scale,
                                                       d.rrc.ratio, d.hflip)
            tried.append(f"{cand.name}: {why}")
            self._account(tried[-1:])
        raise DatasetError(f"{TRIES} samples in a row failed to decode: {tried}")

    def _decode(self, fed: Fed):
        """Stage 1 (a thread of its own, see `staged`): the batch's one decode call."""
        self._account(fed.errors)
        sizes = np.diff(fed.offsets).tolist()
        datas = list(torch.split(fed.buf, sizes)) if sizes else []  # views, no copy
        images, derrs = decode_batch(datas, self.device, self._nvdecoder(), self.fallbacks, fed.cpu_only)
        return fed, datas, images, derrs

    def _finish(self, decoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: the workers' kernel rows as they are (one copy each), one kernel launch.
        Only images the decoder refused or decoded at another size than their header's take
        the per-image path (`_mend`)."""
        from fastcls.kernels.resized_crop import pack_images, pack_in_place, reads_in_place, resized_crop_normalize
        fed, datas, images, derrs = decoded
        size = self.size(self.order.epoch)  # only the output grid changes; boxes are in source pixels
        got = np.array([(-1, -1) if im is None else (im.shape[1], im.shape[2]) for im in images],
                       np.int64).reshape(-1, 2)
        bad = np.flatnonzero((got != fed.hw).any(1))
        box, window, flip, labels = fed.box, fed.window, fed.flip, fed.labels
        if len(bad):
            images, box, window, flip, labels = self._mend(fed, datas, images, derrs, got, bad, size)
        y = torch.from_numpy(labels).to(self.device, non_blocking=True)
        if not images:
            return torch.empty((0, 3, size, size), dtype=self.dtype, device=self.device,
                               memory_format=torch.channels_last), y
        # CHW or HWC-memory views, strides recorded; on CUDA read where they are (no copy of
        # the decoded batch), on CPU packed into one buffer for the torch reference
        src, geom, _ = (pack_in_place if reads_in_place(self.device) else pack_images)(images)
        geom[:, 4:8] = torch.from_numpy(window)
        x = resized_crop_normalize(src, geom, torch.from_numpy(box), torch.from_numpy(flip), (size, size),
                                   MEAN, STD, self.dtype, self.antialias_above)
        return x, y

    def _mend(self, fed: Fed, datas, images, derrs, got: np.ndarray, bad: np.ndarray, size: int):
        """The rare path, per image: a sample the batch decoder refused is dropped in
        evaluation (no image scored twice) and replaced in training (the replacement rule,
        `_replace`); one decoded at another size than its header said is replaced in
        training (its crop was drawn for the header's size) and kept in evaluation with the
        box of its decoded size. -> (images, box, window, flip, labels) of the kept ones."""
        epoch, n = self.order.epoch, len(images)
        images = list(images)
        box, window, flip, labels = fed.box.copy(), fed.window.copy(), fed.flip.copy(), fed.labels.copy()
        keep = np.ones(n, bool)
        refused = set(bad.tolist())  # the rest are the images in hand a stream's replacements come from
        batch = [Raw(bytes(datas[i].numpy()), int(fed.labels[i]), fed.slots[i], fed.names[i])
                 for i in range(n) if i not in refused] if self.train else []
        for i in bad.tolist():
            h, w = (int(v) for v in got[i])
            if images[i] is not None and not self.train:
                b, win, f = kernel_rows([Crop(0, 0, h, w, False, h, w)], False, self.val_resize, size)
                box[i], window[i], flip[i] = b[0], win[0], f[0]
                continue
            if images[i] is not None:
                derrs[i] = f"decoded {w}x{h}, header says {fed.hw[i, 1]}x{fed.hw[i, 0]}"
            self._account([f"{fed.names[i]}: {derrs[i]}"])
            if not self.train:
                keep[i] = False  # evaluation drops it: no image is scored twice
                continue
            img, label, crop = self._replace(Raw(b"", int(fed.labels[i]), fed.slots[i], fed.names[i]),
                                             fed.attempts[i], epoch, batch)
            b, win, f = kernel_rows([crop], True, self.val_resize, size)
            images[i], labels[i], box[i], window[i], flip[i] = img, label, b[0], win[0], f[0]
        idx = np.flatnonzero(keep)
        return [images[i] for i in idx], box[idx], window[idx], flip[idx], labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_files = []
        self.fallbacks = collections.Counter()
        # Read -> decode -> kernel of the next batches in a background thread (a side stream
        # on CUDA), so the decoders' host waits never hold the training thread.
        # sync_side_stream: torchvision's CUDA decode_jpeg runs nvJPEG on a private stream
        # without waiting for the caller's (pytorch/vision PR 9606), so the previous batch's
        # kernel, still reading blocks the allocator may hand to the decoder, must be
        # finished first (the training stream is not waited on).
        yield from staged(batches_with_timeout(iter(self.loader), self.timeout), self._finish,
                          self.device, decode=self._decode, side=self.side_stream,
                          sync_side_stream=self.decoder == "torchvision")

    def epoch_warnings(self) -> list[str]:
        """One line when images fell back from the batch decoder this epoch."""
        n = sum(self.fallbacks.values())
        if not n:
            return []
        why = ", ".join(f"{k}: {v}" for k, v in self.fallbacks.most_common() if v)
        return [f"{n} of {self.num_images} images this epoch were not decoded by the "
                f"{self.decoder} batch call and were decoded one by one ({why})"]
