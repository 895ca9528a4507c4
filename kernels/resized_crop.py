"""Fused crop -> bilinear resize (optional antialias) -> flip -> normalize -> cast, for a
whole ragged batch of decoded images in ONE kernel launch.

    out = resized_crop_normalize(src, geom, box, flip, (H, W), mean, std, dtype)

Inputs (all on the same device; build them with `pack_images` + `rrc_box` /
`resize_center_crop_box`):

- src:  uint8 1-D tensor, every image of the batch back to back (any per-image layout).
- geom: int64 N×8 per image: [offset, stride_c, stride_y, stride_x, lo_y, hi_y, lo_x, hi_x]
        `offset` is the element index of pixel (c=0, y=0, x=0) in `src`; the strides are in
        elements; [lo, hi) is the source window the filter may read (the crop for random
        crops, the whole image for resize + center crop), so nothing outside it leaks in.
- box:  float32 N×4 per image: [origin_y, origin_x, scale_y, scale_x]: output pixel
        (i, j) has its centre at source coordinate (origin_y + (i + .5) * scale_y,
        origin_x + (j + .5) * scale_x) (pixel k of the source covers [k, k + 1)).
- flip: uint8 N, 1 = mirror the output horizontally.
- mean, std: 3 floats each in 0..255 units (ImageNet: MEAN/STD of fastcls.data.native).
- antialias_above: per axis, when the source/output scale exceeds this value the bilinear
  (triangle) filter is widened to `scale` source pixels, as torchvision's `antialias=True`;
  otherwise it is plain 2-tap bilinear (`antialias=False`). 1.0 = always antialias when
  downscaling (exactly torchvision antialias=True), inf = never (exactly antialias=False),
  2.0 = only when downscaling by more than 2 (where plain bilinear starts to skip pixels).

Output: dtype N×3×H×W in channels_last memory, (pixel - mean) / std, float math inside.

The sampling is the one of `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False, antialias=...)` applied to the crop: tests hold the reference to
`torchvision.transforms.v2.functional.resized_crop` and `Resize + CenterCrop`, and the
Triton kernel to the reference (under TRITON_INTERPRET=1 on CPU).

Written by hand because no library offers it: torchvision/kornia resize one image (or one
equal-size batch) per call, so a ragged batch costs N launches plus N normalize passes;
DALI fuses this but is the dependency this path exists to avoid.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch

try:  # Triton is optional: the reference runs everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for Linux ship triton
    triton = None

GEOM_FIELDS = 8
BOX_FIELDS = 4


# --------------------------------------------------------------------------- host helpers

def pack_images(images: Sequence[torch.Tensor], layout: str = "CHW") -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Concatenate uint8 images into one flat buffer (one copy for the batch, one `cat`).

    Each image is 3×H×W ("CHW") or H×W×3 ("HWC"); a 3×H×W *view* of an HWC buffer (e.g.
    `hwc.permute(2, 0, 1)`, what nvImageCodec gives) is packed as HWC without a copy, by
    recording its strides. Anything else (row-padded buffers) is made contiguous first.
    Returns (src, geom with lo/hi = the whole image, [(H, W)]); `build_params` sets the
    crop windows."""
    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout must be CHW or HWC, got {layout!r}")
    if not images:
        raise ValueError("pack_images: empty batch")
    sizes, rows, flats, offset = [], [], [], 0
    hwc = layout == "HWC"
    for im in images:  # per image: attribute reads and one view; the batch loader's hot loop
        if hwc:
            im = im.permute(2, 0, 1)
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"expected 3 channels of uint8 in 3-D {layout} images, got {im.dtype} "
                             f"{tuple(im.shape)}")
        _, h, w = im.shape
        st = im.stride()
        if st != (h * w, w, 1) and st != (1, 3 * w, 3):  # neither CHW nor HWC memory: copy
            im = im.contiguous()
            st = im.stride()
        rows.append((offset, *st, 0, h, 0, w))
        sizes.append((h, w))
        # the image's memory as one flat view (both layouts are dense), so offset + c*s_c +
        # y*s_y + x*s_x addresses (c, y, x)
        flats.append(im.as_strided((3 * h * w,), (1,)))
        offset += 3 * h * w
    src = torch.cat(flats)
    geom = torch.tensor(rows, dtype=torch.int64)
    return src, geom, sizes


def reads_in_place(device: torch.device) -> bool:
    """Whether the kernel on `device` reads decoded images where they are (`pack_in_place`:
    the Triton kernel, on CUDA) rather than from one packed copy (`pack_images`: the torch
    reference, on CPU)."""
    return triton is not None and device.type == "cuda"


def pack_in_place(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """`pack_images` without the copy, for the Triton kernel only: each image is read where
    it is. `src` is a 1-D view of the image at the lowest address and each geom offset is an
    image's byte distance from it (>= 0), so `src + offset` addresses every image in one
    launch with the kernel unchanged (a flat 64-bit address space, as on CUDA; also the
    Triton interpreter's, which reads host addresses). The images must stay alive, on one
    device, until the kernel has run (stream order on CUDA). The torch reference indexes
    `src`'s own storage and cannot take this: it gets `pack_images`."""
    if not images:
        raise ValueError("pack_in_place: empty batch")
    sizes, rows, ptrs = [], [], []
    for im in images:
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"expected 3 channels of uint8 in 3-D CHW images, got {im.dtype} {tuple(im.shape)}")
        _, h, w = im.shape
        st = im.stride()
        if st != (h * w, w, 1) and st != (1, 3 * w, 3):
            raise ValueError(f"pack_in_place reads CHW or HWC memory; got strides {st}")
        ptrs.append(im.data_ptr())
        rows.append([0, *st, 0, h, 0, w])
        sizes.append((h, w))
    low = min(range(len(images)), key=ptrs.__getitem__)
    geom = torch.tensor(rows, dtype=torch.int64)
    geom[:, 0] = torch.tensor(ptrs, dtype=torch.int64) - ptrs[low]
    return images[low].as_strided((1,), (1,)), geom, sizes


def rrc_box(top: int, left: int, h: int, w: int, out_hw: tuple[int, int]) -> tuple[list[float], tuple[int, int, int, int]]:
    """Crop (top, left, h, w) resized to out_hw: (box row, window lo_y, hi_y, lo_x, hi_x)."""
    return [float(top), float(left), h / out_hw[0], w / out_hw[1]], (top, top + h, left, left + w)


def resize_center_crop_box(height: int, width: int, resize: int, size: int) -> tuple[list[float], tuple[int, int, int, int]]:
    """torchvision `Resize(resize)` (shorter side) then `CenterCrop(size)`, as one sampling:
    (box row, window = whole image). Requires resize >= size (no padding)."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = resize, int(resize * long / short)   # torchvision's rounding
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))                      # CenterCrop's offsets
    left = int(round((new_w - size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return [top * sy, left * sx, sy, sx], (0, height, 0, width)


def build_params(geom: torch.Tensor, boxes: Sequence[Sequence[float]],
                 windows: Sequence[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill geom's window columns and build the float box tensor (host, before one H2D copy)."""
    geom = geom.clone()
    geom[:, 4:8] = torch.tensor(windows, dtype=torch.int64).view(-1, 4)
    return geom, torch.tensor(boxes, dtype=torch.float32).view(-1, BOX_FIELDS)


def _check(src, geom, box, flip, out_hw):
    n = geom.shape[0]
    if src.dtype != torch.uint8 or src.dim() != 1:
        raise ValueError(f"src must be a 1-D uint8 tensor, got {src.dtype} {tuple(src.shape)}")
    if geom.shape != (n, GEOM_FIELDS) or geom.dtype != torch.int64:
        raise ValueError(f"geom must be int64 N×{GEOM_FIELDS}, got {geom.dtype} {tuple(geom.shape)}")
    if box.shape != (n, BOX_FIELDS) or box.dtype != torch.float32:
        raise ValueError(f"box must be float32 N×{BOX_FIELDS}, got {box.dtype} {tuple(box.shape)}")
    if flip.shape != (n,):
        raise ValueError(f"flip must have shape ({n},), got {tuple(flip.shape)}")
    if out_hw[0] <= 0 or out_hw[1] <= 0:
        raise ValueError(f"output size must be positive, got {out_hw}")


def _alloc(n, out_hw, dtype, device, out):
    if out is None:
        return torch.empty((n, 3, *out_hw), dtype=dtype, device=device, memory_format=torch.channels_last)
    if out.shape != (n, 3, *out_hw) or out.dtype != dtype or \
            not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"out must be {dtype} {(n, 3, *out_hw)} channels_last")
    return out


# --------------------------------------------------------------------------- reference

def _axis_taps(n_out: int, origin: float, scale: float, lo: int, hi: int,
               antialias_above: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter taps of one axis: (index n_out×T into the window lo..hi-1, weight n_out×T
    float32, rows summing to 1). Output pixel i is centred at c = origin + (i + .5) * scale;
    source pixel k (covering [k, k+1)) weighs max(0, 1 - |k + .5 - c| / support), support =
    scale when antialiasing a downscale, else 1 (2-tap bilinear): torch's separable filter."""
    support = scale if (scale > antialias_above and scale > 1.0) else 1.0
    taps = int(2 * support) + 2
    centre = origin + (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    first = torch.floor(centre - support + 0.5).clamp_min(lo)
    k = first[:, None] + torch.arange(taps, dtype=torch.float64)            # source pixels
    w = (1.0 - (k + 0.5 - centre[:, None]).abs() / support).clamp_min(0.0)
    w = torch.where(k < hi, w, 0.0)
    w = w / w.sum(1, keepdim=True)
    return (k.clamp_max(hi - 1) - lo).long(), w.float()


def resized_crop_normalize_reference(src: torch.Tensor, geom: torch.Tensor, box: torch.Tensor,
                                     flip: torch.Tensor, out_hw: tuple[int, int],
                                     mean: Sequence[float], std: Sequence[float],
                                     dtype: torch.dtype = torch.float32,
                                     antialias_above: float = 1.0,
                                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch version, one image at a time, separable: gather the taps of every output
    column and weight them (horizontal pass), then the same for rows. Same contract as the
    module doc; on CPU this is what the batched loader runs."""
    _check(src, geom, box, flip, out_hw)
    n = geom.shape[0]
    out = _alloc(n, out_hw, dtype, src.device, out)
    g, b, f = geom.tolist(), box.tolist(), flip.tolist()  # host metadata: one copy each
    m = torch.tensor(mean, dtype=torch.float32, device=src.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=src.device).view(3, 1, 1)
    for i in range(n):
        off, sc, sy, sx, lo_y, hi_y, lo_x, hi_x = g[i]
        oy, ox, scy, scx = b[i]
        win = src.as_strided((3, hi_y - lo_y, hi_x - lo_x), (sc, sy, sx), off + lo_y * sy + lo_x * sx).float()
        iy, wy = (t.to(src.device) for t in _axis_taps(out_hw[0], oy, scy, lo_y, hi_y, antialias_above))
        ix, wx = (t.to(src.device) for t in _axis_taps(out_hw[1], ox, scx, lo_x, hi_x, antialias_above))
        rows = (win[:, :, ix] * wx).sum(-1)                        # 3 × h × W
        img = (rows[:, iy, :] * wy[:, :, None]).sum(2)             # 3 × H × W
        if f[i]:
            img = img.flip(-1)
        out[i] = ((img - m) / s).to(dtype)
    return out


# --------------------------------------------------------------------------- Triton

if triton is not None:
    @triton.jit
    def _resized_crop_kernel(src, geom, box, flip, out, H_OUT, W_OUT, antialias_above,
                             m0, m1, m2, r0, r1, r2, BLOCK: tl.constexpr):
        # grid = (N, ceil(H*W / BLOCK)): one program = BLOCK output pixels of one image, so
        # the per-image parameters (and the number of filter taps) are scalars.
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H_OUT * W_OUT
        oy = offs // W_OUT
        ox = offs % W_OUT
        g = geom + n * 8
        base = tl.load(g)
        s_c = tl.load(g + 1)
        s_y = tl.load(g + 2)
        s_x = tl.load(g + 3)
        lo_y = tl.load(g + 4)
        hi_y = tl.load(g + 5)
        lo_x = tl.load(g + 6)
        hi_x = tl.load(g + 7)
        b = box + n * 4
        org_y = tl.load(b)
        org_x = tl.load(b + 1)
        sc_y = tl.load(b + 2)
        sc_x = tl.load(b + 3)
        flipped = tl.load(flip + n) != 0
        sx_pix = tl.where(flipped, W_OUT - 1 - ox, ox)
        cy = org_y + (oy.to(tl.float32) + 0.5) * sc_y     # filter centres, source pixels
        cx = org_x + (sx_pix.to(tl.float32) + 0.5) * sc_x
        sup_y = tl.where((sc_y > antialias_above) & (sc_y > 1.0), sc_y, 1.0)
        sup_x = tl.where((sc_x > antialias_above) & (sc_x > 1.0), sc_x, 1.0)
        inv_y = 1.0 / sup_y
        inv_x = 1.0 / sup_x
        # First tap and tap count: pixels k with |k + .5 - c| < support, inside [lo, hi).
        y0 = tl.maximum(tl.floor(cy - sup_y + 0.5).to(tl.int64), lo_y)
        x0 = tl.maximum(tl.floor(cx - sup_x + 0.5).to(tl.int64), lo_x)
        # At most ceil(2 * support) pixels lie strictly within `support` of a centre, and
        # y0/x0 is the first of them: 2 taps per axis for plain bilinear.
        taps_y = (2.0 * sup_y).to(tl.int32)
        taps_y += (taps_y.to(tl.float32) < 2.0 * sup_y).to(tl.int32)
        taps_x = (2.0 * sup_x).to(tl.int32)
        taps_x += (taps_x.to(tl.float32) < 2.0 * sup_x).to(tl.int32)
        wx_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for tx in range(0, taps_x):
            xx = x0 + tx
            wx = tl.maximum(1.0 - tl.abs(xx.to(tl.float32) + 0.5 - cx) * inv_x, 0.0)
            wx_sum += tl.where(xx < hi_x, wx, 0.0)
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        wy_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for ty in range(0, taps_y):
            yy = y0 + ty
            in_y = yy < hi_y
            wy = tl.maximum(1.0 - tl.abs(yy.to(tl.float32) + 0.5 - cy) * inv_y, 0.0)
            wy = tl.where(in_y, wy, 0.0)
            wy_sum += wy
            row = src + base + yy * s_y
            for tx in range(0, taps_x):
                xx = x0 + tx
                ok = mask & in_y & (xx < hi_x)
                wx = tl.maximum(1.0 - tl.abs(xx.to(tl.float32) + 0.5 - cx) * inv_x, 0.0)
                w = wy * wx
                p = row + xx * s_x
                acc0 += w * tl.load(p, mask=ok, other=0).to(tl.float32)
                acc1 += w * tl.load(p + s_c, mask=ok, other=0).to(tl.float32)
                acc2 += w * tl.load(p + 2 * s_c, mask=ok, other=0).to(tl.float32)
        norm = 1.0 / tl.where(mask, wy_sum * wx_sum, 1.0)  # lanes past the end read nothing
        dst = out + n.to(tl.int64) * H_OUT * W_OUT * 3 + offs * 3   # channels_last: N,H,W,C
        ty_ = out.dtype.element_ty
        tl.store(dst, ((acc0 * norm - m0) * r0).to(ty_), mask=mask)
        tl.store(dst + 1, ((acc1 * norm - m1) * r1).to(ty_), mask=mask)
        tl.store(dst + 2, ((acc2 * norm - m2) * r2).to(ty_), mask=mask)


def resized_crop_normalize_triton(src: torch.Tensor, geom: torch.Tensor, box: torch.Tensor,
                                  flip: torch.Tensor, out_hw: tuple[int, int],
                                  mean: Sequence[float], std: Sequence[float],
                                  dtype: torch.dtype = torch.float32,
                                  antialias_above: float = 1.0,
                                  out: Optional[torch.Tensor] = None, block: int = 256) -> torch.Tensor:
    """Triton version, one launch for the batch; same contract as the reference. Runs on
    CUDA, or on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported)."""
    if triton is None:
        raise RuntimeError("resized_crop_normalize_triton: triton is not installed")
    _check(src, geom, box, flip, out_hw)
    n = geom.shape[0]
    out = _alloc(n, out_hw, dtype, src.device, out)
    if n == 0:
        return out
    dev = src.device
    geom = geom.to(dev, non_blocking=True)
    box = box.to(dev, non_blocking=True)
    flip = flip.to(dev, torch.uint8, non_blocking=True)
    aa = float(antialias_above) if math.isfinite(antialias_above) else 3.0e38
    grid = (n, triton.cdiv(out_hw[0] * out_hw[1], block))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        # Triton launches on the current device: make it the tensors' one (multi-GPU hosts)
        _resized_crop_kernel[grid](src, geom, box, flip, out, out_hw[0], out_hw[1], aa,
                                   float(mean[0]), float(mean[1]), float(mean[2]),
                                   1.0 / std[0], 1.0 / std[1], 1.0 / std[2], BLOCK=block)
    return out


def resized_crop_normalize(src: torch.Tensor, geom: torch.Tensor, box: torch.Tensor,
                           flip: torch.Tensor, out_hw: tuple[int, int],
                           mean: Sequence[float], std: Sequence[float],
                           dtype: torch.dtype = torch.float32, antialias_above: float = 1.0,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors, the reference otherwise."""
    fn = resized_crop_normalize_triton if (src.is_cuda and triton is not None) \
        else resized_crop_normalize_reference
    return fn(src, geom, box, flip, out_hw, mean, std, dtype, antialias_above, out)
