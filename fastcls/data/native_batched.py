"""The `native` backend, batched path (`data.native_decode: batched`, the default on CUDA).

DataLoader workers only read file bytes. The main process then, per batch:

1. decodes the batch in one call (`data.decoder`): nvImageCodec when installed (on CUDA
   the hardware JPEG engines + CUDA decoder, on CPU its CPU-only backend), otherwise
   `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, libjpeg-turbo on CPU);
   grayscale and CMYK come out RGB; a file the batch decoder refuses (PNG named .jpg, a
   JPEG flavour nvJPEG lacks) is decoded alone on the CPU (torchvision, then PIL) and
   moved to the device;
2. uses the crop box and flip each worker drew on the CPU from the header's image size
   with the per-sample generator (seed, epoch, index): the same boxes and flips as the
   PIL-worker path (redrawn here only if the decoded size differs or for a replacement);
3. runs ONE fused kernel for the ragged batch (kernels/resized_crop.py: crop -> bilinear
   resize, antialias per `data.antialias` -> flip -> normalize -> cast -> channels_last):
   Triton on CUDA, the torch reference on CPU.

On CUDA, steps 1-3 of batch k+1 are queued on a side stream right after batch k is handed
to the training loop, so they overlap its step. A file that does not decode is counted in
`bad_files` (limit `data.max_bad_fraction`) and replaced by another sample in training,
dropped in evaluation, as in the PIL path.

Output contract (fastcls.data.base.Loader): images `dtype` N×3×S×S channels_last on `device`, ImageNet
normalized; labels int64 on `device`.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ANTIALIAS_MODES
from .base import MEAN, STD, LoaderBase, LoaderSpec, cuda_prefetch
from .crop import sample_rrc
from .folder import DatasetError, FolderIndex
from .native import _REPLACEMENT_TRIES, batches_with_timeout, worker_loader

# data.antialias -> the kernel's `antialias_above` (source/output scale above which the
# bilinear filter widens like torchvision antialias=True).
ANTIALIAS_ABOVE = {"on": 1.0, "auto": 2.0, "off": math.inf}
assert set(ANTIALIAS_ABOVE) == set(ANTIALIAS_MODES)


def jpeg_truncated(raw: bytes) -> bool:
    """True for a JPEG cut short: no end-of-image marker (FF D9) after its last start-of-scan
    (FF DA). libjpeg refuses such files but GPU decoders may return them half grey, so
    they are caught here, the same for every decoder. (Entropy-coded data cannot contain
    FF D9: a data FF byte is always followed by 00; trailing bytes after EOI are allowed.)"""
    if raw[:2] != b"\xff\xd8":
        return False
    return raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda")


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def decode_one_cpu(data: torch.Tensor) -> torch.Tensor:
    """Any image file's bytes -> uint8 3×H×W RGB on the CPU (torchvision, PIL for the rest:
    BMP, TIFF, ...). Raises on undecodable data."""
    from torchvision.io import ImageReadMode, decode_image
    if data.numel() == 0:
        raise ValueError("empty file")
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        import io
        from PIL import Image
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


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


class NvImageCodecDecoder:
    """nvImageCodec batch decode: on CUDA the hardware JPEG engines (A100/H100/H200 NVJPG)
    plus the CUDA decoder; on CPU its CPU-only backend (libjpeg-turbo, PNG, BMP, ...).

    __call__(list of uint8 1-D CPU byte tensors) -> list of uint8 3×H×W RGB views (HWC
    memory, no copy) on `device`, None where nvImageCodec could not decode."""

    def __init__(self, device: torch.device):
        from nvidia import nvimgcodec
        self.nv, self.device = nvimgcodec, device
        if device.type == "cuda":
            self.decoder = nvimgcodec.Decoder(device_id=device.index if device.index is not None
                                              else torch.cuda.current_device())
        else:
            self.decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        # No EXIF rotation: the same pixels as torchvision.io and the PIL path.
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False,
                                              color_spec=nvimgcodec.ColorSpec.SRGB,
                                              sample_format=nvimgcodec.SampleFormat.I_RGB)

    def __call__(self, datas: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        outs = self.decoder.decode([d.numpy() for d in datas], params=self.params, cuda_stream=stream)
        images: list[Optional[torch.Tensor]] = []
        for o in outs:
            if o is None:
                images.append(None)
            elif o.buffer_kind == self.nv.ImageBufferKind.STRIDED_DEVICE:
                images.append(torch.from_dlpack(o).permute(2, 0, 1))
            else:  # host image (CPU backend, or a codec without a GPU decoder)
                t = torch.from_numpy(np.asarray(o))
                images.append(t.to(self.device, non_blocking=True).permute(2, 0, 1))
        return images


def decode_batch(datas: list[torch.Tensor], device: torch.device,
                 nvdecoder: Optional[NvImageCodecDecoder] = None) -> tuple[list[Optional[torch.Tensor]], list[Optional[str]]]:
    """Decode file bytes (CPU uint8 1-D) -> (uint8 3×H×W RGB on `device` or None, error or None).

    With `nvdecoder`, nvImageCodec decodes the whole batch (any format it knows). Else JPEGs
    go through one batched torchvision `decode_jpeg` call; if it raises (one bad file fails
    the whole call), they are retried one by one so only the bad ones are lost. Whatever is
    left is decoded alone on the CPU (torchvision, then PIL) and moved to the device."""
    from torchvision.io import ImageReadMode, decode_jpeg
    images: list[Optional[torch.Tensor]] = [None] * len(datas)
    errors: list[Optional[str]] = [None] * len(datas)
    if not datas:
        return images, errors
    if nvdecoder is not None:
        images = nvdecoder(datas)
        alone = [i for i, im in enumerate(images) if im is None]
    else:
        is_jpeg = [_is_jpeg(d) for d in datas]
        jpeg = [i for i, j in enumerate(is_jpeg) if j]
        alone = [i for i, j in enumerate(is_jpeg) if not j]
        if jpeg:
            try:
                out = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
                for i, im in zip(jpeg, out):
                    images[i] = im
            except RuntimeError:
                alone += jpeg  # rare: find the bad file(s) one at a time
    for i in alone:
        try:
            if nvdecoder is None and device.type == "cuda" and _is_jpeg(datas[i]):
                try:
                    images[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device)
                    continue
                except RuntimeError:
                    pass  # e.g. a JPEG flavour nvJPEG lacks: the CPU decoder may still read it
            images[i] = decode_one_cpu(datas[i]).to(device, non_blocking=True)
        except Exception as e:  # any undecodable file: decoders raise many types
            errors[i] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return images, errors


class FileBytes(Dataset):
    """Map-style dataset keyed by (index, epoch): returns (uint8 1-D file bytes, label,
    index, error or None, crop or None). Workers read the bytes and, in training, the image
    size from the header (PIL, lazy: no decode) to draw the crop box and flip from the
    per-sample generator (seed, epoch, index), exactly as the PIL path does: that per-image
    Python work (~30 us) stays off the main process. crop = (top, left, h, w, flip, H, W)."""

    def __init__(self, index: FolderIndex, train: bool = False, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), hflip: float = 0.5, seed: int = 0):
        self.samples = index.samples
        self.train, self.scale, self.ratio, self.hflip, self.seed = train, scale, ratio, hflip, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        idx, epoch = key
        path, label = self.samples[idx]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            return torch.empty(0, dtype=torch.uint8), label, idx, f"{type(e).__name__}: {e}", None
        if jpeg_truncated(raw):
            return torch.empty(0, dtype=torch.uint8), label, idx, "truncated JPEG (no end-of-image marker)", None
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        crop = None
        if self.train and raw:
            try:
                import io
                from PIL import Image
                with Image.open(io.BytesIO(raw)) as im:
                    width, height = im.size
                rng = np.random.default_rng((self.seed, epoch, idx))  # as FolderDataset
                box = sample_rrc(width, height, self.scale, self.ratio, rng)
                crop = (*box, bool(rng.random() < self.hflip), height, width)
            except Exception:  # unreadable header: the main process decides (decode error)
                crop = None
        return data, label, idx, None, crop


def collate_bytes(batch):
    """-> (list of byte tensors, labels, indices, read errors, crops), lists."""
    return tuple(list(x) for x in zip(*batch))


class BatchedNativeLoader(LoaderBase):
    """The data interface (fastcls.data.base.Loader): byte-reading workers + batched decode
    + one fused crop/resize/normalize kernel per batch. Same boxes as the PIL path for the
    same seed."""

    def __init__(self, index: FolderIndex, spec: LoaderSpec):
        d = spec.data
        super().__init__(len(index.samples), spec)
        self.classes, self.empty_classes, self.excluded = index.classes, index.empty_classes, index.excluded
        self.samples = index.samples
        self.train, self.device, self.dtype = spec.train, spec.device, spec.dtype
        self.size, self.val_resize = d.image_size, d.val_resize
        self.scale, self.ratio, self.hflip, self.seed = tuple(d.rrc.scale), tuple(d.rrc.ratio), d.hflip, spec.seed
        self.antialias_above = ANTIALIAS_ABOVE[d.antialias]
        self.decoder = resolve_decoder(d.decoder)  # "nvimgcodec" | "torchvision"
        self._nv: Optional[NvImageCodecDecoder] = None  # created on first use, main process only
        self.loader = worker_loader(FileBytes(index, spec.train, self.scale, self.ratio, d.hflip, spec.seed),
                                    self.sampler, collate_bytes, d.workers, d.timeout)
        self.timeout = d.timeout if d.workers > 0 else 0

    # ------------------------------------------------------------------ one batch

    def _nvdecoder(self) -> Optional[NvImageCodecDecoder]:
        if self.decoder == "nvimgcodec" and self._nv is None:
            self._nv = NvImageCodecDecoder(self.device)
        return self._nv

    def _replace(self, key: int, epoch: int) -> tuple[torch.Tensor, int, np.random.Generator]:
        """Training: another sample for a file that failed, drawn from its own generator
        (rare path: read + decoded alone in the main process)."""
        rng = np.random.default_rng((self.seed, epoch, key, 1))
        errors = []
        for _ in range(_REPLACEMENT_TRIES):
            j = int(rng.integers(len(self.samples)))
            data, label, _, err, _ = self.loader.dataset[(j, epoch)]  # same read + checks
            if err is None:
                (img,), (err,) = decode_batch([data], self.device, self._nvdecoder())
                if img is not None:
                    return img, label, rng
            errors.append(f"{self.samples[j][0]}: {err}")
            self._account(errors[-1:])
        raise DatasetError(f"{_REPLACEMENT_TRIES} files in a row failed to decode: {errors}")

    def _process(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from fastcls.kernels.resized_crop import (build_params, pack_images,
                                                  resize_center_crop_box,
                                                  resized_crop_normalize, rrc_box)
        datas, labels, idxs, read_errors, crops = batch
        epoch = self.sampler.epoch
        images, errors = decode_batch(datas, self.device, self._nvdecoder())
        bad = []
        kept_images, kept_labels, boxes, windows, flips = [], [], [], [], []
        for img, label, idx, rerr, derr, crop in zip(images, labels, idxs, read_errors, errors, crops):
            rng = None
            if img is None:
                bad.append(f"{self.samples[idx][0]}: {rerr or derr}")
                if not self.train:
                    continue  # evaluation drops it: no image is scored twice
                self._account(bad)
                bad = []
                img, label, rng = self._replace(idx, epoch)
                crop = None
            h, w = img.shape[1], img.shape[2]
            if self.train:
                if crop is None or crop[5:] != (h, w):  # header size unknown or not the decoded one
                    if rng is None:
                        rng = np.random.default_rng((self.seed, epoch, idx))
                    crop = (*sample_rrc(w, h, self.scale, self.ratio, rng), bool(rng.random() < self.hflip))
                b, win = rrc_box(*crop[:4], (self.size, self.size))
                flips.append(crop[4])
            else:
                b, win = resize_center_crop_box(h, w, self.val_resize, self.size)
                flips.append(False)
            kept_images.append(img)
            kept_labels.append(label)
            boxes.append(b)
            windows.append(win)
        self._account(bad)
        y = torch.tensor(kept_labels, dtype=torch.int64).to(self.device, non_blocking=True)
        if not kept_images:
            return torch.empty((0, 3, self.size, self.size), dtype=self.dtype, device=self.device,
                               memory_format=torch.channels_last), y
        src, geom, _ = pack_images(kept_images)  # CHW or HWC-memory views: strides recorded
        geom, box = build_params(geom, boxes, windows)
        flip = torch.tensor(flips, dtype=torch.uint8)
        x = resized_crop_normalize(src, geom, box, flip, (self.size, self.size), MEAN, STD,
                                   self.dtype, self.antialias_above)
        return x, y

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.bad_files = []
        batches = batches_with_timeout(iter(self.loader), self.timeout)
        if self.device.type == "cuda":
            # sync_side_stream: torchvision's CUDA decode_jpeg runs nvJPEG on a private stream
            # without waiting for the caller's (pytorch/vision PR 9606), so the previous
            # batch's kernel, still reading blocks the allocator may hand to the decoder, must
            # be finished first (the training stream is not waited on).
            yield from cuda_prefetch(batches, self._process, self.device, sync_side_stream=True)
            return
        for batch in batches:
            yield self._process(batch)
