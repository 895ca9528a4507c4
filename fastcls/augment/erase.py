"""Erasing family: Cutout, Random Erasing, GridMask, Hide-and-Seek; per-sample random,
vectorized over the batch (one mask per sample built from broadcast comparisons, no Python
loop over samples, no host<->device sync).

Data contract for every function here: images float N×3×H×W, already normalized (ImageNet
mean/std), any layout (channels_last kept), any float dtype, on the generator's device;
labels int64 (N,) pass through. They run after normalization, as in PaddleClas (the guide's
source), so the constant fill 0 is the dataset mean colour.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from ..config import FILL_MODES


def _keep_layout(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(h, device=device).view(1, h, 1), torch.arange(w, device=device).view(1, 1, w))


def _fill_erase(images: torch.Tensor, mask: torch.Tensor, fill: str, generator) -> torch.Tensor:
    """images where mask (N,H,W) is False; the fill value where it is True."""
    n, c, h, w = images.shape
    m = mask.unsqueeze(1)
    if fill == "const":
        value = images.new_zeros(())
    elif fill == "rand":   # one normal value per sample and channel (timm "rand")
        value = torch.randn((n, c, 1, 1), generator=generator, device=images.device).to(images.dtype)
    elif fill == "pixel":  # a normal value per pixel (timm "pixel")
        value = torch.randn((n, c, h, w), generator=generator, device=images.device).to(images.dtype)
    else:
        raise ValueError(f"fill: unknown mode {fill!r}; valid choices: {', '.join(FILL_MODES)}")
    return _keep_layout(torch.where(m, value, images), images)


def cutout_mask(n: int, h: int, w: int, generator, device, *, n_holes: int = 1, length: int = 112,
                prob: float = 1.0) -> torch.Tensor:
    """bool (N, H, W): DeVries & Taylor 2017 (https://arxiv.org/abs/1708.04552), the
    reference code's square: centre uniform over the image, side `length` clipped at the
    borders; `n_holes` per sample (may overlap); each sample cut with probability `prob`."""
    cy = torch.randint(0, h, (n, n_holes), generator=generator, device=device)
    cx = torch.randint(0, w, (n, n_holes), generator=generator, device=device)
    on = torch.rand(n, generator=generator, device=device) < prob
    half = length // 2
    y1, y2 = (cy - half).clamp(0, h), (cy + half).clamp(0, h)
    x1, x2 = (cx - half).clamp(0, w), (cx + half).clamp(0, w)
    ys, xs = _grid(h, w, device)
    ys, xs = ys.unsqueeze(1), xs.unsqueeze(1)      # (1,1,H,1), (1,1,1,W) against (N,holes,1,1)
    v = lambda t: t.view(n, n_holes, 1, 1)  # noqa: E731
    inside = (ys >= v(y1)) & (ys < v(y2)) & (xs >= v(x1)) & (xs < v(x2))
    return inside.any(dim=1) & on.view(n, 1, 1)


def cutout(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
           n_holes: int = 1, length: int = 112, prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cutout: zero (= mean colour) `n_holes` squares of side `length` px per sample."""
    n, _, h, w = images.shape
    mask = cutout_mask(n, h, w, generator, images.device, n_holes=n_holes, length=length, prob=prob)
    return _fill_erase(images, mask, "const", generator), labels


def random_erasing_mask(n: int, h: int, w: int, generator, device, *, prob: float = 0.5,
                        area: Sequence[float] = (0.02, 0.4), aspect: Sequence[float] = (0.3, 1 / 0.3),
                        log_aspect: bool = False, count: int = 1, attempts: int = 100) -> torch.Tensor:
    """bool (N, H, W): Zhong et al. 2017 (https://arxiv.org/abs/1708.04896).

    Per sample, with probability `prob`, `count` rectangles; each: up to `attempts` tries of
    target area ~ U(area) * H * W / count, aspect ~ U(aspect) (log-uniform with
    `log_aspect`, as torchvision/timm), h = round(sqrt(A * r)), w = round(sqrt(A / r)); the
    first try with h < H and w < W is placed uniformly (top-left in [0, H-h] x [0, W-w]);
    no valid try = no rectangle. All tries are drawn at once and the first valid one is
    picked with argmax, so the result equals the sequential loop's."""
    shape = (n, count, attempts)
    f = dict(generator=generator, device=device, dtype=torch.float64)
    target = (area[0] + (area[1] - area[0]) * torch.rand(shape, **f)) * (h * w) / count
    u = torch.rand(shape, **f)
    if log_aspect:
        lo, hi = math.log(aspect[0]), math.log(aspect[1])
        ratio = torch.exp(lo + (hi - lo) * u)
    else:
        ratio = aspect[0] + (aspect[1] - aspect[0]) * u
    eh = torch.round(torch.sqrt(target * ratio)).long()
    ew = torch.round(torch.sqrt(target / ratio)).long()
    valid = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = valid.long().argmax(dim=2, keepdim=True)          # first valid try (0 if none)
    ok = valid.gather(2, first).squeeze(2)                      # (n, count)
    eh, ew = eh.gather(2, first).squeeze(2), ew.gather(2, first).squeeze(2)
    top = (torch.rand((n, count), **f) * (h - eh + 1)).floor().long().clamp(max=h - 1)
    left = (torch.rand((n, count), **f) * (w - ew + 1)).floor().long().clamp(max=w - 1)
    on = (torch.rand(n, **f) < prob).view(n, 1) & ok
    ys, xs = _grid(h, w, device)
    ys, xs = ys.unsqueeze(1), xs.unsqueeze(1)
    v = lambda t: t.view(n, count, 1, 1)  # noqa: E731
    inside = (ys >= v(top)) & (ys < v(top + eh)) & (xs >= v(left)) & (xs < v(left + ew)) & v(on)
    return inside.any(dim=1)


def random_erasing(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
                   prob: float = 0.5, area: Sequence[float] = (0.02, 0.4),
                   aspect: Sequence[float] = (0.3, 1 / 0.3), log_aspect: bool = False, count: int = 1,
                   attempts: int = 100, fill: str = "const") -> tuple[torch.Tensor, torch.Tensor]:
    """Random Erasing; `fill` const (0 = mean colour) | rand (normal per channel) | pixel
    (normal per pixel), as timm's modes."""
    n, _, h, w = images.shape
    mask = random_erasing_mask(n, h, w, generator, images.device, prob=prob, area=area,
                               aspect=aspect, log_aspect=log_aspect, count=count, attempts=attempts)
    return _fill_erase(images, mask, fill, generator), labels


def gridmask_mask(n: int, h: int, w: int, generator, device, *, d1: int = 96, d2: int = 224,
                  ratio: float = 0.6, rotate: int = 1, mode: int = 1, prob: float = 0.8) -> torch.Tensor:
    """bool (N, H, W) of erased pixels: GridMask (Chen et al. 2020, https://arxiv.org/abs/2001.04086)
    as PaddleClas/the authors' code draws it: period d ~ U{d1..d2-1}, stripe width
    l = int(d * ratio + 0.5), offsets st_h, st_w ~ U{0..d-1}, angle ~ U{0..rotate-1} degrees,
    on a 1.5x canvas centre-cropped to the image. Stripes are the rows/columns with
    (canvas coordinate - offset) mod d < l; mode 0 erases the stripes, mode 1 the squares
    between them (the paper's figure). Each sample is masked with probability `prob`.
    Rotation is evaluated analytically (nearest canvas pixel) instead of rotating a mask image."""
    f = dict(generator=generator, device=device)
    d = torch.randint(d1, d2, (n,), **f)
    length = (d.double() * ratio + 0.5).floor().long()
    st_h = (torch.rand(n, dtype=torch.float64, **f) * d).floor().long()
    st_w = (torch.rand(n, dtype=torch.float64, **f) * d).floor().long()
    angle = torch.randint(0, max(rotate, 1), (n,), **f).double()
    on = torch.rand(n, **f) < prob
    return gridmask_from_params(h, w, d, length, st_h, st_w, angle, mode, rotated=rotate > 1) & on.view(n, 1, 1)


def gridmask_from_params(h: int, w: int, d: torch.Tensor, length: torch.Tensor, st_h: torch.Tensor,
                         st_w: torch.Tensor, angle: torch.Tensor, mode: int, rotated: bool = True) -> torch.Tensor:
    """bool (N, H, W) erased pixels for given per-sample period, stripe width, offsets (int64
    (N,)) and angle (float64 degrees (N,)); `rotated=False` promises all angles are 0."""
    n, device = d.shape[0], d.device
    hh, ww = int(1.5 * h), int(1.5 * w)
    oy, ox = (hh - h) // 2, (ww - w) // 2
    ys, xs = _grid(h, w, device)
    dv, lv = d.view(n, 1, 1), length.view(n, 1, 1)
    if not rotated:  # rows and columns separately: (N,H,1) | (N,1,W), no per-pixel trigonometry
        stripe = ((ys + oy - st_h.view(n, 1, 1)) % dv < lv) | ((xs + ox - st_w.view(n, 1, 1)) % dv < lv)
        return stripe if mode == 0 else ~stripe
    yc = (ys + oy).float() + 0.5 - hh / 2  # pixel centre relative to the canvas centre
    xc = (xs + ox).float() + 0.5 - ww / 2
    a = torch.deg2rad(angle).float().view(n, 1, 1)
    # Source canvas pixel of each output pixel under a counter-clockwise rotation by `angle`.
    sy = torch.floor(-torch.sin(a) * xc + torch.cos(a) * yc + hh / 2).long()
    sx = torch.floor(torch.cos(a) * xc + torch.sin(a) * yc + ww / 2).long()
    stripe = ((sy - st_h.view(n, 1, 1)) % dv < lv) | ((sx - st_w.view(n, 1, 1)) % dv < lv)
    return stripe if mode == 0 else ~stripe


def gridmask(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
             d1: int = 96, d2: int = 224, ratio: float = 0.6, rotate: int = 1, mode: int = 1,
             prob: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """GridMask: zero (= mean colour) a rotated grid per sample; see `gridmask_mask`."""
    n, _, h, w = images.shape
    mask = gridmask_mask(n, h, w, generator, images.device, d1=d1, d2=d2, ratio=ratio,
                         rotate=rotate, mode=mode, prob=prob)
    return _fill_erase(images, mask, "const", generator), labels


@lru_cache(maxsize=None)
def _sizes(grid_sizes: tuple, device) -> torch.Tensor:
    """Cached on the device: building it from a list every step is a blocking copy on CUDA."""
    return torch.tensor(grid_sizes, device=device)


def hide_and_seek_mask(n: int, h: int, w: int, generator, device, *,
                       grid_sizes: Sequence[int] = (0, 16, 32, 44, 56), hide_prob: float = 0.5) -> torch.Tensor:
    """bool (N, H, W): Hide-and-Seek (Singh & Lee 2017, https://arxiv.org/abs/1811.02545) as
    PaddleClas: per sample a grid size s from `grid_sizes` (uniform; 0 = hide nothing), the
    image cut into s×s patches from the top-left, each patch hidden with probability
    `hide_prob`."""
    s = _sizes(tuple(grid_sizes), device)[torch.randint(0, len(grid_sizes), (n,), generator=generator, device=device)]
    smallest = min([g for g in grid_sizes if g > 0], default=max(h, w))
    cells_y, cells_x = -(-h // smallest), -(-w // smallest)
    hide = torch.rand((n, cells_y, cells_x), generator=generator, device=device) < hide_prob
    div = s.clamp_min(1).view(n, 1, 1)
    ys, xs = _grid(h, w, device)
    iy = (ys // div).clamp(max=cells_y - 1).expand(n, h, w)
    ix = (xs // div).clamp(max=cells_x - 1).expand(n, h, w)
    picked = hide[torch.arange(n, device=device).view(n, 1, 1), iy, ix]
    return picked & (s > 0).view(n, 1, 1)


def hide_and_seek(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, *,
                  grid_sizes: Sequence[int] = (0, 16, 32, 44, 56),
                  hide_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide-and-Seek: zero (= mean colour) random grid patches; see `hide_and_seek_mask`."""
    n, _, h, w = images.shape
    mask = hide_and_seek_mask(n, h, w, generator, images.device, grid_sizes=grid_sizes, hide_prob=hide_prob)
    return _fill_erase(images, mask, "const", generator), labels
