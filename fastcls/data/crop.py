"""Random-resized-crop box sampling, the distribution of torchvision's RandomResizedCrop.

Sampled on the CPU from an explicit numpy Generator so that a box depends only on
(seed, epoch, sample index), not on which worker or backend draws it.
"""
from __future__ import annotations

import math

import numpy as np


def sample_rrc(width: int, height: int, scale: tuple[float, float],
               ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Return (top, left, crop_h, crop_w) in pixels of a width×height image.

    Same algorithm as `torchvision.transforms.v2.RandomResizedCrop.get_params`: up to 10
    tries of area ~ U(scale) * image area and log-aspect ~ U(log ratio); the first box
    that fits wins, else a center crop with the aspect ratio clamped to `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """Box (left, top, right, bottom) in source pixels that `Resize(resize)` (shorter side)
    followed by `CenterCrop(size)` maps onto the output, as floats for PIL's `box=`."""
    s = resize / min(width, height)
    crop = min(size / s, width, height)  # min(): float rounding when resize == size
    left = (width - crop) / 2
    top = (height - crop) / 2
    return left, top, left + crop, top + crop
