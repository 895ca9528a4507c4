"""Mixup (Zhang et al. 2018, https://arxiv.org/abs/1710.09412) and CutMix (Yun et al. 2019,
https://arxiv.org/abs/1905.04899) with timm's `timm.data.Mixup` semantics, vectorized.

Why not call timm: its `Mixup` draws from the global `np.random` (no explicit generator, so a
resumed run cannot repeat the stream) and loops in Python over the batch in `pair`/`elem`
mode. Here every draw comes from an explicit `torch.Generator` on the training device and all
three modes are one masked blend over the whole batch (no host<->device sync).

Semantics (= timm 1.0): the partner of sample i is sample N-1-i (the batch reversed);
`mode` batch = one draw for the batch, pair = one draw per (i, N-1-i) pair shared by both,
elem = one draw per sample. Per draw: with probability `prob` mix, else leave the sample
alone (lam = 1); when both alphas are > 0, CutMix is chosen with probability `switch_prob`;
lam ~ Beta(alpha, alpha). CutMix box: side ratio sqrt(1 - lam), centre uniform, clipped to
the image (or, with `cutmix_minmax`, side lengths uniform in [min, max) of the image side);
with `correct_lam` (or minmax) lam becomes 1 - box area / image area. Targets:
lam * smooth(y) + (1 - lam) * smooth(y_partner), smooth: off = s/C, on = 1 - s + s/C.

Odd batch sizes (timm asserts even): the middle sample is its own partner, so it stays
unmixed with its own (smoothed) label; in `pair` mode it gets lam = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import MIX_MODES
from ..loss import smooth_targets


@dataclass
class MixDraws:
    """Raw random draws for k independent mixing decisions (k = 1, N//2 or N by mode).

    All float64/int64 tensors of shape (k,) on one device. `cy, cx` are box centres (no
    minmax) or the top-left corner (minmax); `cut_h, cut_w` are only used with minmax."""
    apply: torch.Tensor       # bool: mix this one (u < prob)
    use_cutmix: torch.Tensor  # bool
    lam: torch.Tensor         # float64 Beta draw (already the mixup or cutmix one)
    cy: torch.Tensor
    cx: torch.Tensor
    cut_h: Optional[torch.Tensor] = None
    cut_w: Optional[torch.Tensor] = None


def sample_beta(alpha: float, k: int, generator: torch.Generator, device) -> torch.Tensor:
    """k draws of Beta(alpha, alpha), float64, from `generator` (via two Gamma draws:
    torch.distributions.Beta takes no generator)."""
    a = torch.full((2, k), float(alpha), dtype=torch.float64, device=device)
    g = torch._standard_gamma(a, generator=generator)
    return g[0] / (g[0] + g[1]).clamp_min(torch.finfo(torch.float64).tiny)


def _randint(high: torch.Tensor, generator, low: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Uniform integers in [low, high) per element (high > low), int64."""
    low = torch.zeros_like(high) if low is None else low
    u = torch.rand(high.shape, generator=generator, device=high.device, dtype=torch.float64)
    return (low + (u * (high - low)).floor().long()).clamp(max=(high - 1).clamp_min(low))


def draw_mix(k: int, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float,
             cutmix_minmax: Optional[tuple[float, float]], prob: float, switch_prob: float,
             generator: torch.Generator, device) -> MixDraws:
    """Draw the k decisions (timm's `_params_per_elem` + `rand_bbox`/`rand_bbox_minmax`)."""
    f64 = dict(dtype=torch.float64, device=device, generator=generator)
    apply = torch.rand(k, **f64) < prob
    both = mixup_alpha > 0 and cutmix_alpha > 0
    if both:
        use_cut = torch.rand(k, **f64) < switch_prob
        lam = torch.where(use_cut, sample_beta(cutmix_alpha, k, generator, device),
                          sample_beta(mixup_alpha, k, generator, device))
    elif mixup_alpha > 0:
        use_cut = torch.zeros(k, dtype=torch.bool, device=device)
        lam = sample_beta(mixup_alpha, k, generator, device)
    elif cutmix_alpha > 0 or cutmix_minmax is not None:
        use_cut = torch.ones(k, dtype=torch.bool, device=device)
        lam = sample_beta(cutmix_alpha, k, generator, device) if cutmix_alpha > 0 else \
            torch.ones(k, dtype=torch.float64, device=device)
    else:
        raise ValueError("mixup: both mixup_alpha and cutmix_alpha are 0 (mixing is off)")
    lam = torch.where(apply, lam, torch.ones_like(lam))
    hk = torch.full((k,), height, dtype=torch.long, device=device)
    wk = torch.full((k,), width, dtype=torch.long, device=device)
    if cutmix_minmax is not None:
        lo, hi = cutmix_minmax
        cut_h = _randint(torch.full_like(hk, int(height * hi)), generator, torch.full_like(hk, int(height * lo)))
        cut_w = _randint(torch.full_like(wk, int(width * hi)), generator, torch.full_like(wk, int(width * lo)))
        cy = _randint(hk - cut_h + 1, generator)  # top-left in [0, H - cut_h]
        cx = _randint(wk - cut_w + 1, generator)
        return MixDraws(apply, use_cut, lam, cy, cx, cut_h, cut_w)
    return MixDraws(apply, use_cut, lam, _randint(hk, generator), _randint(wk, generator))


def boxes_and_lam(d: MixDraws, height: int, width: int, correct_lam: bool,
                  minmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes int64 (k, 4) = yl, yh, xl, xh; lam float64 (k,)) as timm's cutmix_bbox_and_lam.

    Samples that do not use CutMix get an empty box and keep their Beta lam."""
    if minmax:
        yl, xl = d.cy, d.cx
        yh, xh = yl + d.cut_h, xl + d.cut_w
    else:
        ratio = torch.sqrt(1.0 - d.lam)
        cut_h = (height * ratio).long()   # int() truncation, as timm
        cut_w = (width * ratio).long()
        yl = (d.cy - cut_h // 2).clamp(0, height)
        yh = (d.cy + (cut_h + 1) // 2).clamp(0, height)
        xl = (d.cx - cut_w // 2).clamp(0, width)
        xh = (d.cx + (cut_w + 1) // 2).clamp(0, width)
    cut = d.use_cutmix & (d.lam < 1.0)
    lam = d.lam
    if correct_lam or minmax:
        area = ((yh - yl) * (xh - xl)).double()
        lam = torch.where(cut, 1.0 - area / float(height * width), lam)
    boxes = torch.stack([yl, yh, xl, xh], dim=1)
    boxes = torch.where(cut.unsqueeze(1), boxes, torch.zeros_like(boxes))
    return boxes, lam


def expand_to_batch(x: torch.Tensor, n: int, mode: str, fill) -> torch.Tensor:
    """Per-draw values (k, ...) -> per-sample (n, ...) for `mode`; pair mirrors i <-> n-1-i."""
    if mode == "batch":
        return x[:1].expand(n, *x.shape[1:])
    if mode == "elem":
        return x
    k = n // 2
    middle = x.new_full((n - 2 * k, *x.shape[1:]), fill)
    return torch.cat([x[:k], middle, x[:k].flip(0)], dim=0)


def apply_mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float,
              lam: torch.Tensor, use_cutmix: torch.Tensor, boxes: torch.Tensor, *, can_mix: bool = True,
              can_cut: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend every sample with its partner (the batch reversed), per-sample parameters.

    images: float N×3×H×W (any layout, any float dtype, any device); labels: int64 (N,);
    lam float (N,) after box correction; use_cutmix bool (N,); boxes int64 (N, 4).
    `can_mix`/`can_cut` False (known from the config) skip the blend or the box pass: the
    output is the same, at half the memory traffic.
    Returns images (same dtype/layout) and soft targets float32 (N, C), rows summing to 1."""
    n, _, h, w = images.shape
    partner = images.flip(0)
    out = images
    if can_cut:
        ys = torch.arange(h, device=images.device).view(1, 1, h, 1)
        xs = torch.arange(w, device=images.device).view(1, 1, 1, w)
        b = boxes.view(n, 4, 1, 1)
        inbox = (ys >= b[:, 0:1]) & (ys < b[:, 1:2]) & (xs >= b[:, 2:3]) & (xs < b[:, 3:4])
        out = torch.where(use_cutmix.view(n, 1, 1, 1) & inbox, partner, images)
    if can_mix:
        # fp32 weights (a bf16 lam would be off by up to 0.4% from the target's); lam = 1
        # gives exactly the image.
        lam_x = lam.float().view(n, 1, 1, 1)
        mixed = (images * lam_x + partner * (1.0 - lam_x)).to(images.dtype)
        out = torch.where((~use_cutmix).view(n, 1, 1, 1), mixed, out) if can_cut else mixed
    out = out.contiguous(memory_format=torch.channels_last) if \
        images.is_contiguous(memory_format=torch.channels_last) else out
    lam_t = lam.float().unsqueeze(1)
    y1 = smooth_targets(labels, num_classes, smoothing)
    targets = y1 * lam_t + y1.flip(0) * (1.0 - lam_t)
    return out, targets


def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
                 num_classes: int, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
                 cutmix_minmax: Optional[tuple[float, float]] = None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", correct_lam: bool = True,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """images float N×3×H×W (normalized, any layout), labels int64 (N,) on the generator's
    device -> (mixed images, same dtype/layout; soft targets float32 (N, C)).

    Parameters and semantics: timm's `Mixup` (see the module docstring)."""
    if mode not in MIX_MODES:
        raise ValueError(f"mixup.mode: unknown mode {mode!r}; valid choices: {', '.join(MIX_MODES)}")
    if cutmix_minmax is not None:
        cutmix_alpha = 1.0  # as timm: minmax boxes imply CutMix (lam then comes from the box)
    n, _, h, w = images.shape
    k = {"batch": 1, "pair": n // 2, "elem": n}[mode]
    d = draw_mix(k, h, w, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                 cutmix_minmax=cutmix_minmax, prob=prob, switch_prob=switch_prob,
                 generator=generator, device=images.device)
    boxes, lam = boxes_and_lam(d, h, w, correct_lam, cutmix_minmax is not None)
    lam = expand_to_batch(lam, n, mode, 1.0)
    use_cut = expand_to_batch(d.use_cutmix & (d.lam < 1.0), n, mode, False)
    boxes = expand_to_batch(boxes, n, mode, 0)
    return apply_mix(images, labels, num_classes, label_smoothing, lam, use_cut, boxes,
                     can_mix=mixup_alpha > 0, can_cut=cutmix_alpha > 0)
