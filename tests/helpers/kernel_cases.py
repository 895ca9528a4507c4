"""Irregular inputs for kernels/resized_crop.py, shared by the in-process reference tests
and the Triton-interpreter check (tests/helpers/kernels_interp_check.py runs in a subprocess so
that TRITON_INTERPRET=1 is set before triton decorates the kernel)."""
from __future__ import annotations

import torch

from fastcls.kernels.resized_crop import build_params, pack_images, resize_center_crop_box, rrc_box

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# (image H, W), crop (top, left, h, w), output (H, W), flip
RRC_CASES = {
    "odd_sizes": ((37, 53), (5, 7, 21, 33), (13, 17), 0),
    "one_pixel_crop": ((9, 200), (3, 20, 1, 1), (13, 17), 1),
    "whole_image_flip": ((40, 30), (0, 0, 40, 30), (13, 17), 1),
    "bottom_right_corner_pixel": ((40, 30), (39, 29, 1, 1), (5, 3), 0),
    "touch_bottom_left": ((40, 30), (10, 0, 30, 30), (16, 16), 0),
    "extreme_wide": ((3, 300), (0, 0, 3, 300), (16, 16), 0),     # x down 18.75, y up
    "extreme_tall": ((300, 2), (0, 0, 300, 2), (16, 16), 1),
    "downscale_3x": ((64, 70), (2, 4, 48, 51), (16, 16), 0),     # antialias on in auto mode
    "downscale_exact_2x": ((32, 32), (0, 0, 32, 32), (16, 16), 1),
    "upscale": ((11, 13), (1, 2, 7, 9), (16, 16), 0),
}
# (image H, W), resize, crop size
VAL_CASES = {
    "landscape": ((37, 53), 20, 17),
    "portrait": ((53, 37), 20, 17),
    "square_equal": ((16, 16), 16, 16),
    "tiny_upscale": ((5, 7), 20, 17),
    "extreme_strip": ((300, 2), 20, 17),
    "big_downscale": ((120, 90), 20, 16),
}
ANTIALIAS = {"on": 1.0, "auto": 2.0, "off": float("inf")}


def make_image(h: int, w: int, seed: int, smooth: bool = False) -> torch.Tensor:
    """uint8 3×h×w: noise (worst case for sampling bugs) or a smooth ramp."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        base = torch.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(h + w, 1)])
        return base.round().to(torch.uint8)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def rrc_batch(names, layout: str = "CHW"):
    """-> (src, geom, box, flip, out_hw, images) for RRC cases sharing one output size."""
    images = [make_image(*RRC_CASES[n][0], seed=i) for i, n in enumerate(names)]
    packed = [im.permute(1, 2, 0).contiguous() if layout == "HWC" else im for im in images]
    src, geom, _ = pack_images(packed, layout)
    out_hw = RRC_CASES[names[0]][2]
    rows = [rrc_box(*RRC_CASES[n][1], out_hw) for n in names]
    geom, box = build_params(geom, [r[0] for r in rows], [r[1] for r in rows])
    flip = torch.tensor([RRC_CASES[n][3] for n in names], dtype=torch.uint8)
    return src, geom, box, flip, out_hw, images


def val_batch(names):
    images = [make_image(*VAL_CASES[n][0], seed=10 + i) for i, n in enumerate(names)]
    src, geom, _ = pack_images(images)
    size = VAL_CASES[names[0]][2]
    rows = [resize_center_crop_box(*VAL_CASES[n][0], VAL_CASES[n][1], size) for n in names]
    geom, box = build_params(geom, [r[0] for r in rows], [r[1] for r in rows])
    return src, geom, box, torch.zeros(len(names), dtype=torch.uint8), (size, size), images
