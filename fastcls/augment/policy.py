"""AutoAugment (Cubuk et al. 2019, https://arxiv.org/abs/1805.09501) and RandAugment (Cubuk et
al. 2020, https://arxiv.org/abs/1909.13719) on the device, with a different op per sample.

torchvision's `transforms.v2.AutoAugment`/`RandAugment` pick ONE op for the whole batch when
given a batch tensor, so they cannot be used on a batch as is. Here the policy tables and
magnitude bins are torchvision's own (`_AUGMENTATION_SPACE`, `_get_policies`: the library is
the single source of the numbers), and each op is re-expressed with per-sample parameters,
following torchvision's uint8 kernels step by step so the results agree (tested op by op
against torchvision on the same input and magnitude).

Where it sits: these ops have uint8 semantics (posterize masks bits, solarize thresholds at
255*m, equalize builds a 256-bin histogram), so the batch is de-normalized to 0..255,
rounded to uint8 on the device, transformed, and normalized again; first in the chain,
before the erasing family and mixup (PaddleClas applies them to the uint8 crop too). The
round trip is exact for fp32 loader output; bf16 loader output (GPU + AMP) carries ~0.5
grey-level error before rounding, so a pixel can move by one level.

Vectorization: for every op the whole batch is transformed and `torch.where` keeps it for
the samples that drew it (no host<->device sync, no per-sample loop); the affine ops
(shear/translate/rotate) share one `grid_sample` with a per-sample matrix. On the CPU, ops
that no sample drew are skipped (a host read is free there).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as tnf
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..config import AUTOAUGMENT_POLICIES

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_INDEX = {name: i for i, name in enumerate(OPS)}
_AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_BLEND = ("Brightness", "Color", "Contrast")
POLICIES = {name: T.AutoAugmentPolicy[name.upper()] for name in AUTOAUGMENT_POLICIES}
_RAD2DEG, _DEG2RAD = 180.0 / math.pi, math.pi / 180.0  # CPython's math.degrees/radians factors
SKIP_UNUSED_ON_CPU = True  # see apply_ops; tests turn it off to check the accelerator path on CPU

# Constant tensors are built once per (device, shape) and cached: creating them from Python
# data every step would be a blocking host->device copy (a sync) on CUDA.


# ----------------------------------------------------------------------------- uint8 round trip

@lru_cache(maxsize=None)
def _mean_std(device) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data.base import MEAN, STD  # ImageNet mean/std in 0..255 units
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalized float N×3×H×W -> uint8 0..255 (layout kept)."""
    mean, std = _mean_std(images.device)
    return images.float().mul(std).add_(mean).round_().clamp_(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 N×3×H×W -> normalized float `dtype`, channels_last."""
    mean, std = _mean_std(x.device)
    out = x.float().sub_(mean).div_(std).to(dtype)
    return out.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- magnitudes

def magnitude_table(space: dict, num_bins: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 (len(OPS), num_bins) magnitudes, bool (len(OPS),) signed) from a torchvision
    `_AUGMENTATION_SPACE`; ops without a magnitude (or absent from the space) get 0."""
    table = torch.zeros(len(OPS), num_bins, dtype=torch.float64)
    signed = torch.zeros(len(OPS), dtype=torch.bool)
    for name, (fn, sgn) in space.items():
        mags = fn(num_bins, height, width)
        if mags is not None and mags.ndim > 0:
            table[OP_INDEX[name]] = mags.to(torch.float64)
        signed[OP_INDEX[name]] = sgn
    return table.to(device), signed.to(device)


# ----------------------------------------------------------------------------- the ops

def _affine_theta(op: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """float32 (N, 2, 3) inverse affine matrices as torchvision's `_get_inverse_affine_matrix`
    builds them for each op (identity for non-affine ops), in float64 then cast like torchvision."""
    z = torch.zeros_like(mag)
    is_ = lambda name: op == OP_INDEX[name]  # noqa: E731
    shear_deg = torch.atan(mag) * _RAD2DEG            # math.degrees(math.atan(m))
    sx = torch.where(is_("ShearX"), shear_deg, z) * _DEG2RAD
    sy = torch.where(is_("ShearY"), shear_deg, z) * _DEG2RAD
    angle = -torch.remainder(mag, 360.0)               # rotate: angle % 360, then -angle
    rot = torch.where(is_("Rotate"), angle, z) * _DEG2RAD
    tx = torch.where(is_("TranslateX"), torch.trunc(mag), z)  # translate=[int(m), 0]
    ty = torch.where(is_("TranslateY"), torch.trunc(mag), z)
    shear = is_("ShearX") | is_("ShearY")               # center=[0, 0] -> top-left corner
    cx = torch.where(shear, z - w * 0.5, z)
    cy = torch.where(shear, z - h * 0.5, z)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    rot_minus_sy = rot - sy
    a = torch.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot_minus_sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    cxp, cyp = cx + tx, cy + ty
    m2 = z + (cx - m0 * cxp - m1 * cyp)
    m5 = z + (cy - m3 * cxp - m4 * cyp)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3).to(torch.float32)


@lru_cache(maxsize=32)
def _base_grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's `_affine_grid` base grid (1, H*W, 3) and its divisor, float32."""
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    return base.view(1, h * w, 3), torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=device)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """uint8 batch warped by per-sample theta: torchvision's `_affine_grid` + nearest
    `grid_sample`, zeros outside (AutoAugment's default fill)."""
    n, _, h, w = x.shape
    base, div = _base_grid(h, w, x.device)
    scaled = theta.transpose(1, 2).div(div)
    grid = base.expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    out = tnf.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _grayscale_floor(xf: torch.Tensor) -> torch.Tensor:
    r, g, b = xf.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def _blend(xf: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision `_blend` with a per-sample ratio (N,1,1,1): x*r + other*(1-r), clamped;
    addcmul rounds like torchvision's fused add-with-alpha (bit-identical, tested)."""
    return torch.addcmul(xf * ratio.to(torch.float32), other, (1.0 - ratio).to(torch.float32)).clamp_(0, 255)


@lru_cache(maxsize=None)
def _smooth_kernel(device) -> torch.Tensor:
    a, b = 1.0 / 13.0, 5.0 / 13.0  # torchvision's (and PIL's) SMOOTH kernel
    return torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=device)


def _sharpness(xf: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    c = xf.shape[1]
    blurred = tnf.conv2d(xf, _smooth_kernel(xf.device).expand(c, 1, 3, 3), groups=c).round_()
    out = xf.clone()
    view = out[..., 1:-1, 1:-1]
    view.addcmul_(blurred.sub_(view), (1.0 - ratio).to(torch.float32))
    return out.clamp_(0, 255)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `autocontrast_image` for uint8, same arithmetic, with torch.where where it
    assigns through a boolean mask (`minimum[eq] = 0`: a nonzero, i.e. a sync, on CUDA)."""
    xf = x.float()
    lo = xf.amin(dim=(-2, -1), keepdim=True)
    hi = xf.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, 1.0, (hi - lo).mul_(1.0 / 255))
    lo = torch.where(flat, 0.0, lo)
    return xf.sub_(lo).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def apply_ops(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """One op per sample on a uint8 batch.

    x: uint8 N×3×H×W on any device; op: int64 (N,) indices into OPS; mag: float64 (N,)
    signed magnitudes in torchvision's units (shear factor, translate px, degrees, enhance
    delta m -> factor 1 + m, posterize bits, solarize fraction of 255). Returns uint8 N×3×H×W."""
    n, _, h, w = x.shape
    if x.device.type == "cpu" and SKIP_UNUSED_ON_CPU:  # free host read on the CPU: skip ops nobody drew
        present = set(torch.unique(op).tolist())
    else:                        # on an accelerator a host read is a sync: run every op
        present = set(range(len(OPS)))
    view = lambda t: t.view(n, 1, 1, 1)  # noqa: E731
    out = x
    if present & {OP_INDEX[k] for k in _AFFINE}:
        is_affine = sum(op == OP_INDEX[k] for k in _AFFINE).bool()
        out = torch.where(view(is_affine), _affine(x, _affine_theta(op, mag, h, w)), out)
    xf = None
    if present & {OP_INDEX[k] for k in _BLEND + ("Sharpness",)}:
        xf = x.float()
        ratio = view(1.0 + mag)
    if present & {OP_INDEX[k] for k in _BLEND}:
        gray = _grayscale_floor(xf)
        other = torch.where(view(op == OP_INDEX["Color"]), gray,
                            torch.where(view(op == OP_INDEX["Contrast"]),
                                        gray.mean(dim=(-3, -2, -1), keepdim=True), torch.zeros_like(gray)))
        is_blend = view(sum(op == OP_INDEX[k] for k in _BLEND).bool())
        out = torch.where(is_blend, _blend(xf, other, ratio).to(torch.uint8), out)
    if OP_INDEX["Sharpness"] in present and h > 2 and w > 2:
        out = torch.where(view(op == OP_INDEX["Sharpness"]), _sharpness(xf, ratio).to(torch.uint8), out)
    if OP_INDEX["Posterize"] in present:
        bits = mag.trunc().long().clamp(0, 8)                        # bits=int(magnitude)
        mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
        out = torch.where(view(op == OP_INDEX["Posterize"]), x & view(mask), out)
    if OP_INDEX["Solarize"] in present:
        thr = view((255.0 * mag).to(torch.float32))
        sol = torch.where(x.float() >= thr, 255 - x, x)
        out = torch.where(view(op == OP_INDEX["Solarize"]), sol, out)
    for name, fn in (("AutoContrast", _autocontrast), ("Equalize", TF.equalize), ("Invert", TF.invert)):
        if OP_INDEX[name] in present:   # batched, per image and channel already
            out = torch.where(view(op == OP_INDEX[name]), fn(x.contiguous()), out)
    return out


# ----------------------------------------------------------------------------- the policies

def _space(cls) -> dict:
    return dict(cls._AUGMENTATION_SPACE)


@lru_cache(maxsize=32)
def _autoaugment_tables(policy: str, h: int, w: int, device):
    """(op (2, P) int64, p (2, P) float64, bin (2, P) int64, magnitudes, signed) on device."""
    subs = T.AutoAugment(POLICIES[policy])._policies
    op = torch.tensor([[OP_INDEX[s[k][0]] for s in subs] for k in range(2)], device=device)
    p = torch.tensor([[s[k][1] for s in subs] for k in range(2)], dtype=torch.float64, device=device)
    mbin = torch.tensor([[s[k][2] if s[k][2] is not None else 0 for s in subs] for k in range(2)], device=device)
    return (op, p, mbin) + magnitude_table(_space(T.AutoAugment), 10, h, w, device)


@lru_cache(maxsize=32)
def _randaugment_tables(num_bins: int, h: int, w: int, device):
    """(choices int64 (14,) op indices, magnitudes, signed) on device."""
    choices = torch.tensor([OP_INDEX[k] for k in _space(T.RandAugment)], device=device)
    return (choices,) + magnitude_table(_space(T.RandAugment), num_bins, h, w, device)


def autoaugment_u8(x: torch.Tensor, generator: torch.Generator, policy: str = "imagenet") -> torch.Tensor:
    """AutoAugment on a uint8 batch: per sample one of the policy's sub-policies (uniform),
    each of its two ops applied with its probability, at its magnitude bin (10 bins), signed
    ops negated with probability 1/2 (torchvision's `AutoAugment.forward`, per sample)."""
    if policy not in POLICIES:
        raise ValueError(f"autoaugment.policy: unknown {policy!r}; valid choices: {', '.join(POLICIES)}")
    n, _, h, w = x.shape
    dev = x.device
    op_t, p_t, bin_t, table, signed = _autoaugment_tables(policy, h, w, dev)
    pick = torch.randint(0, op_t.shape[1], (n,), generator=generator, device=dev)
    for slot in range(2):
        op, p, mbin = op_t[slot][pick], p_t[slot][pick], bin_t[slot][pick]
        apply = torch.rand(n, generator=generator, device=dev, dtype=torch.float64) <= p
        mag = table[op, mbin]
        flip = signed[op] & (torch.rand(n, generator=generator, device=dev, dtype=torch.float64) <= 0.5)
        mag = torch.where(flip, -mag, mag)
        op = torch.where(apply, op, torch.zeros_like(op))  # 0 = Identity
        x = apply_ops(x, op, mag)
    return x


def randaugment_u8(x: torch.Tensor, generator: torch.Generator, num_ops: int = 2, magnitude: int = 5,
                   num_magnitude_bins: int = 11, magnitude_std: float = 0.0) -> torch.Tensor:
    """RandAugment on a uint8 batch: `num_ops` rounds, each sample draws one of torchvision's
    14 RandAugment ops uniformly, at bin `magnitude` of `num_magnitude_bins` (plus, with
    `magnitude_std` > 0, Gaussian noise per sample and round, clipped to the bins and
    interpolated between them, as timm's `magnitude_std`); signed ops negated w.p. 1/2."""
    n, _, h, w = x.shape
    dev = x.device
    choices, table, signed = _randaugment_tables(num_magnitude_bins, h, w, dev)
    top = num_magnitude_bins - 1
    f64 = dict(generator=generator, device=dev, dtype=torch.float64)
    for _ in range(num_ops):
        op = choices[torch.randint(0, choices.shape[0], (n,), generator=generator, device=dev)]
        level = torch.full((n,), float(magnitude), dtype=torch.float64, device=dev)
        if magnitude_std > 0:
            level = (level + magnitude_std * torch.randn(n, **f64)).clamp(0, top)
        lo = level.floor().long().clamp(0, top)
        hi = (lo + 1).clamp(max=top)
        frac = level - lo.double()
        mag = table[op, lo] + frac * (table[op, hi] - table[op, lo])
        flip = signed[op] & (torch.rand(n, **f64) < 0.5)
        x = apply_ops(x, op, torch.where(flip, -mag, mag))
    return x


def autoaugment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
                policy: str = "imagenet") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float N×3×H×W -> same dtype, channels_last; labels pass through."""
    return from_uint8(autoaugment_u8(to_uint8(images), generator, policy), images.dtype), labels


def randaugment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
                num_ops: int = 2, magnitude: int = 5, num_magnitude_bins: int = 11,
                magnitude_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float N×3×H×W -> same dtype, channels_last; labels pass through."""
    out = randaugment_u8(to_uint8(images), generator, num_ops, magnitude, num_magnitude_bins, magnitude_std)
    return from_uint8(out, images.dtype), labels
