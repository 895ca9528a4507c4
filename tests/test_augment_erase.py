"""Erasing family: erased area against the configured ranges (and torchvision's RandomErasing
as the reference distribution), untouched pixels stay untouched, per-sample randomness."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from fastcls.augment import erase as E


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def positive_batch(n, h, w, seed=0):
    """Strictly positive values: an erased (constant 0) pixel is recognisable."""
    return (torch.rand(n, 3, h, w, generator=gen(seed)) + 0.5).contiguous(memory_format=torch.channels_last)


def test_random_erasing_matches_torchvision_distribution():
    n, h, w = 3000, 32, 32
    ours = E.random_erasing_mask(n, h, w, gen(1), "cpu", prob=1.0, area=(0.02, 0.33), aspect=(0.3, 3.3),
                                 log_aspect=True, attempts=10).float().mean((1, 2)).numpy()
    ref_t = T.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    torch.manual_seed(0)
    img = torch.ones(3, h, w)
    ref = np.array([(ref_t(img)[0] == 0).float().mean().item() for _ in range(n)])
    assert abs(ours.mean() - ref.mean()) < 0.01, (ours.mean(), ref.mean())
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(ours, q) - np.quantile(ref, q)) < 0.02, q
    assert abs((ours == 0).mean() - (ref == 0).mean()) < 0.02


@pytest.mark.parametrize("area,aspect", [((0.02, 0.4), (0.3, 1 / 0.3)), ((0.1, 0.2), (0.5, 2.0))])
def test_random_erasing_area_within_range_and_rest_untouched(area, aspect):
    n, h, w = 800, 64, 64
    x = positive_batch(n, h, w)
    y = torch.arange(n)
    out, lab = E.random_erasing(x, y, gen(2), prob=0.5, area=area, aspect=aspect)
    assert lab is y and out.is_contiguous(memory_format=torch.channels_last)
    erased = (out == 0).all(1)                     # (N, H, W)
    assert torch.equal(out[~erased.unsqueeze(1).expand_as(out)], x[~erased.unsqueeze(1).expand_as(x)])
    frac = erased.float().mean((1, 2))
    hit = frac > 0
    assert abs(hit.float().mean().item() - 0.5) < 0.06  # prob
    # rounding h and w to whole pixels moves the area by at most ~(h + w)/2 + 1/4 pixels
    slack = (2 * math.sqrt(area[1] * h * w / aspect[0]) + 1) / (h * w)
    assert frac[hit].min() >= area[0] - slack and frac[hit].max() <= area[1] + slack
    for i in torch.nonzero(hit).flatten()[:50]:    # one solid rectangle per erased sample
        ys, xs = torch.nonzero(erased[i], as_tuple=True)
        box = erased[i, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all() and box.sum() == erased[i].sum()


@pytest.mark.parametrize("fill", ["rand", "pixel"])
def test_random_erasing_fill_modes(fill):
    x = positive_batch(64, 32, 32)
    out, _ = E.random_erasing(x, torch.zeros(64), gen(3), prob=1.0, fill=fill)
    changed = (out != x).any(1)
    assert changed.float().mean() > 0.02
    vals = out.permute(0, 2, 3, 1)[changed]       # (pixels, 3) normal draws
    assert abs(vals.mean().item()) < 0.2 and 0.7 < vals.std().item() < 1.3


def test_cutout_area_matches_the_clipped_square_expectation():
    n, h, w, length = 4000, 48, 40, 24
    frac = E.cutout_mask(n, h, w, gen(4), "cpu", n_holes=1, length=length).float().mean((1, 2)).numpy()

    def mean_len(size):  # centre uniform over 0..size-1, square clipped at the border
        c = np.arange(size)
        return (np.minimum(size, c + length // 2) - np.maximum(0, c - length // 2)).mean()
    expected = mean_len(h) * mean_len(w) / (h * w)
    assert abs(frac.mean() - expected) < 0.01, (frac.mean(), expected)
    assert frac.max() <= (length * length) / (h * w) + 1e-9
    x = positive_batch(8, h, w)
    out, _ = E.cutout(x, torch.zeros(8), gen(5), length=length)
    keep = (out != 0).all(1, keepdim=True).expand_as(x)
    assert torch.equal(out[keep], x[keep])


def paddle_gridmask(h, w, d, l, st_h, st_w, mode):
    """The authors'/PaddleClas loop construction (rotate=1: no rotation), as reference."""
    hh, ww = int(1.5 * h), int(1.5 * w)
    mask = np.ones((hh, ww), np.float32)
    for i in range(-1, hh // d + 1):
        s, t = max(min(d * i + st_h, hh), 0), max(min(d * i + st_h + l, hh), 0)
        mask[s:t, :] *= 0
    for i in range(-1, ww // d + 1):
        s, t = max(min(d * i + st_w, ww), 0), max(min(d * i + st_w + l, ww), 0)
        mask[:, s:t] *= 0
    mask = mask[(hh - h) // 2:(hh - h) // 2 + h, (ww - w) // 2:(ww - w) // 2 + w]
    return (mask == 0) if mode == 0 else (mask == 1)   # erased pixels


@pytest.mark.parametrize("mode", [0, 1])
def test_gridmask_geometry_matches_loop_reference(mode):
    rng = np.random.default_rng(0)
    h, w = 56, 72
    for _ in range(20):
        d = int(rng.integers(8, 40))
        l = int(d * 0.6 + 0.5)
        st_h, st_w = int(rng.integers(d)), int(rng.integers(d))
        t = lambda v: torch.tensor([v])  # noqa: E731
        ref = paddle_gridmask(h, w, d, l, st_h, st_w, mode)
        for rotated in (False, True):  # the row/column shortcut and the rotation path at angle 0
            ours = E.gridmask_from_params(h, w, t(d), t(l), t(st_h), t(st_w), torch.zeros(1, dtype=torch.float64),
                                          mode, rotated=rotated)[0]
            assert np.array_equal(ours.numpy(), ref), (d, st_h, st_w, rotated)


def test_gridmask_prob_rotation_and_untouched():
    n, h, w = 400, 64, 64
    m = E.gridmask_mask(n, h, w, gen(6), "cpu", d1=16, d2=48, ratio=0.5, rotate=360, mode=1, prob=0.8)
    hit = m.flatten(1).any(1).float().mean().item()
    assert abs(hit - 0.8) < 0.07
    frac = m.float().mean((1, 2))
    assert 0.1 < frac[frac > 0].mean() < 0.45      # about (l/d)^2 = 0.25 of each masked image
    x = positive_batch(8, h, w)
    out, _ = E.gridmask(x, torch.zeros(8), gen(7), d1=16, d2=48)
    keep = (out != 0).all(1, keepdim=True).expand_as(x)
    assert torch.equal(out[keep], x[keep])


def test_hide_and_seek_fraction_and_cells():
    n, h, w = 2000, 64, 64
    sizes = (0, 8, 16)
    m = E.hide_and_seek_mask(n, h, w, gen(8), "cpu", grid_sizes=sizes, hide_prob=0.5)
    frac = m.float().mean((1, 2))
    assert abs(frac.mean().item() - 0.5 * 2 / 3) < 0.02
    assert abs((frac == 0).float().mean().item() - 1 / 3) < 0.05  # grid size 0 (plus rare all-shown)
    for i in range(30):  # every mask is made of whole 8x8 or 16x16 cells
        mi = m[i].reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
        assert ((mi.all(1)) | (~mi.any(1))).all()
    x = positive_batch(8, h, w)
    out, _ = E.hide_and_seek(x, torch.zeros(8), gen(9), grid_sizes=sizes)
    keep = (out != 0).all(1, keepdim=True).expand_as(x)
    assert torch.equal(out[keep], x[keep])


def test_per_sample_randomness():
    m = E.random_erasing_mask(16, 32, 32, gen(10), "cpu", prob=1.0)
    assert len({tuple(mi.nonzero()[0].tolist()) for mi in m if mi.any()}) > 8
