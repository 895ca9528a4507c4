"""The batched decode path (`data.backend: native`, `data.native_decode: batched`, the
default on CUDA), over any Source.

DataLoader workers read the batch's bytes from the Source (screened: only image signatures
reach a decoder), read each image's size from its header and draw its crop and flip
(fastcls.data.sample: the same boxes as every path), and hand over one buffer per batch.
A background thread of the main process then, per batch:

1. decodes the batch in one call (`data.decoder`): nvImageCodec when installed (on CUDA
   the hardware JPEG engines + CUDA decoder, on CPU its CPU-only backend), otherwise
   `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg-turbo on CPU);
   grayscale and CMYK come out RGB; a file the batch decoder refuses (PNG named .jpg, a
   JPEG flavour nvJPEG lacks) is decoded alone on the CPU (torchvision, then PIL) and
   moved to the device;
2. uses the crop box and flip each worker drew (drawn here only for a replacement);
3. runs ONE fused kernel for the ragged batch (kernels/resized_crop.py: crop -> bilinear
   resize, antialias per `data.antialias` -> flip -> normalize -> cast -> channels_last):
   Triton on CUDA, the torch reference on CPU.

The thread stages up to two batches ahead (on CUDA on a side stream), so the decoders' host
waits overlap the training steps instead of holding the training thread. A file that does not decode is counted in
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
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..config import ANTIALIAS_MODES
from .base import MEAN, STD, LoaderSpec, SourceLoader, staged
from .sample import TRIES, Raw, candidates, header_size, jpeg_needs_cpu, train_crop, val_box
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
    """In a worker: batch g of `epoch` of the source -> (one uint8 tensor of the kept
    samples' bytes back to back, offsets (N+1), labels, slot sample ids, attempts, names,
    crops (int64 N×7, `Crop` rows; training only), cpu_only (bool N: JPEGs to keep out of a
    GPU batch decode, sample.jpeg_needs_cpu), ["name: reason" of the failures]).

    One tensor per batch: a DataLoader worker hands each returned tensor over through a
    file descriptor of its own, so a tensor per image would exhaust `ulimit -n` (1024) at
    batch 256 x prefetch (and costs 3x the time). A sample that fails screening or whose
    header does not read is replaced here in training (the replacement rule) and dropped in
    evaluation, so the main process only meets what the batch decoder itself refuses."""

    def __init__(self, source, spec: LoaderSpec):
        d = spec.data
        self.source, self.train, self.seed = source, spec.train, spec.seed
        self.scale, self.ratio, self.hflip = d.rrc.scale, d.rrc.ratio, d.hflip

    def __call__(self, epoch: int, g: int):
        batch = self.source.read_batch(epoch, g)
        keep, errors = [], []
        for raw in batch:
            tried = []
            for k, cand, rng in candidates(self.source, raw, epoch, self.seed, train=self.train, batch=batch):
                why = cand.error
                if why is None:
                    try:
                        crop = train_crop(*header_size(cand.data), rng, self.scale, self.ratio, self.hflip) \
                            if self.train else (0,) * 7
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
        return (buf, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]),
                [c.label for c, *_ in keep], [sid for _, sid, _, _ in keep], [k for *_, k, _ in keep],
                [c.name for c, *_ in keep], torch.tensor([list(c) for *_, c in keep], dtype=torch.int64).view(-1, 7),
                [jpeg_needs_cpu(c.data) for c, *_ in keep], errors)


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
        read, screened and decoded alone here) -> (image, label, crop)."""
        tried = []
        for _, cand, rng in candidates(self.source, slot, epoch, self.seed, train=True, batch=batch,
                                       start=attempt + 1):
            why = cand.error
            if why is None:
                data = torch.frombuffer(bytearray(cand.data), dtype=torch.uint8)
                (img,), (why,) = decode_batch([data], self.device, self._nvdecoder(), self.fallbacks,
                                              [jpeg_needs_cpu(cand.data)])
                if img is not None:
                    d = self.data
                    return img, cand.label, train_crop(img.shape[2], img.shape[1], rng, d.rrc.scale,
                                                       d.rrc.ratio, d.hflip)
            tried.append(f"{cand.name}: {why}")
            self._account(tried[-1:])
        raise DatasetError(f"{TRIES} samples in a row failed to decode: {tried}")

    def _process(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from fastcls.kernels.resized_crop import build_params, pack_images, resized_crop_normalize
        buf, offsets, labels, slots, attempts, names, crops, cpu_only, errors = batch
        self._account(errors)
        datas = [buf[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]  # views, no copy
        epoch = self.order.epoch
        size = self.size(epoch)  # only the output grid changes; boxes are in source pixels
        images, derrs = decode_batch(datas, self.device, self._nvdecoder(), self.fallbacks, cpu_only)
        rows = crops.tolist()
        kept_images, kept_labels, boxes, windows, flips = [], [], [], [], []
        for i, img in enumerate(images):
            label, crop = labels[i], rows[i]
            if img is not None and self.train and (img.shape[1], img.shape[2]) != tuple(crop[5:]):
                img, derrs[i] = None, f"decoded {img.shape[2]}x{img.shape[1]}, header says {crop[6]}x{crop[5]}"
            if img is None:
                self._account([f"{names[i]}: {derrs[i]}"])
                if not self.train:
                    continue  # evaluation drops it: no image is scored twice
                kept = [Raw(bytes(d.numpy()), lab, s, n) for d, lab, s, n, im in
                        zip(datas, labels, slots, names, images) if im is not None]
                img, label, crop = self._replace(Raw(b"", label, slots[i], names[i]), attempts[i], epoch, kept)
            h, w = img.shape[1], img.shape[2]
            if self.train:
                top, left, ch, cw, flip = crop[:5]
                boxes.append([float(top), float(left), ch / size, cw / size])
                windows.append((top, top + ch, left, left + cw))
            else:
                left, top, bw, bh = val_box(w, h, self.val_resize, size)
                boxes.append([top, left, bh / size, bw / size])
                windows.append((0, h, 0, w))
                flip = False
            flips.append(bool(flip))
            kept_images.append(img)
            kept_labels.append(label)
        y = torch.tensor(kept_labels, dtype=torch.int64).to(self.device, non_blocking=True)
        if not kept_images:
            return torch.empty((0, 3, size, size), dtype=self.dtype, device=self.device,
                               memory_format=torch.channels_last), y
        src, geom, _ = pack_images(kept_images)  # CHW or HWC-memory views: strides recorded
        geom, box = build_params(geom, boxes, windows)
        x = resized_crop_normalize(src, geom, box, torch.tensor(flips, dtype=torch.uint8), (size, size),
                                   MEAN, STD, self.dtype, self.antialias_above)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_files = []
        self.fallbacks = collections.Counter()
        # Read -> decode -> kernel of the next batches in a background thread (a side stream
        # on CUDA), so the decoders' host waits never hold the training thread.
        # sync_side_stream: torchvision's CUDA decode_jpeg runs nvJPEG on a private stream
        # without waiting for the caller's (pytorch/vision PR 9606), so the previous batch's
        # kernel, still reading blocks the allocator may hand to the decoder, must be
        # finished first (the training stream is not waited on).
        yield from staged(batches_with_timeout(iter(self.loader), self.timeout), self._process,
                          self.device, side=self.side_stream,
                          sync_side_stream=self.decoder == "torchvision")

    def epoch_warnings(self) -> list[str]:
        """One line when images fell back from the batch decoder this epoch."""
        n = sum(self.fallbacks.values())
        if not n:
            return []
        why = ", ".join(f"{k}: {v}" for k, v in self.fallbacks.most_common() if v)
        return [f"{n} of {self.num_images} images this epoch were not decoded by the "
                f"{self.decoder} batch call and were decoded one by one ({why})"]
