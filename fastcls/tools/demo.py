"""The embedded demo dataset: 10 classes of shapes and textures as a JPEG ImageFolder.

Generated deterministically (seeded per image) in a few seconds the first time it is
needed, into `$FASTCLS_CACHE/demo-v1` (default `~/.cache/fastcls/demo-v1`):

    demo-v1/train/<class>/NNNN.jpg   100 per class
    demo-v1/val/<class>/NNNN.jpg      20 per class

Every image has a random two-colour gradient background with noise, a random
foreground colour, and a random size of 64-200 px per side (aspect 0.6-1.6), so no
single colour or size identifies a class: the model has to learn shapes and patterns.
    python -m fastcls.tools.demo [OUT_DIR]   # writes it by hand
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = "demo-v1"
CLASSES = ("checker", "circle", "cross", "dots", "hstripes", "ring", "square", "star",
           "triangle", "vstripes")
PER_CLASS = {"train": 100, "val": 20}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTCLS_CACHE", Path.home() / ".cache" / "fastcls"))


def _colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Two background colours and a foreground colour that differs from both."""
    while True:
        bg0, bg1, fg = rng.integers(0, 256, size=(3, 3))
        if min(np.abs(fg - bg0).sum(), np.abs(fg - bg1).sum()) > 200:
            return bg0, bg1, tuple(int(c) for c in fg)


def _polygon(cx: float, cy: float, radii: list[float], rot: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def render(cls: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `cls`."""
    w = int(rng.integers(64, 201))
    h = int(np.clip(round(w * math.exp(rng.uniform(math.log(0.6), math.log(1.6)))), 64, 200))
    bg0, bg1, fg = _colors(rng)
    t = np.linspace(0.0, 1.0, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, h)[:, None, None]
    bg = bg0 * (1 - t) + bg1 * t + rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(np.broadcast_to(bg, (h, w, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    m = min(w, h)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    r = rng.uniform(0.25, 0.4) * m
    rot = rng.uniform(-0.35, 0.35)
    if cls == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif cls == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(3, int(r * 0.3)))
    elif cls == "square":
        d.polygon(_polygon(cx, cy, [r * 1.2] * 4, rot + math.pi / 4), fill=fg)
    elif cls == "triangle":
        d.polygon(_polygon(cx, cy, [r * 1.2] * 3, rot - math.pi / 2), fill=fg)
    elif cls == "star":
        d.polygon(_polygon(cx, cy, [r * 1.25, r * 0.5] * 5, rot - math.pi / 2), fill=fg)
    elif cls == "cross":
        a, b = r * 1.1, r * 0.33
        d.rectangle((cx - a, cy - b, cx + a, cy + b), fill=fg)
        d.rectangle((cx - b, cy - a, cx + b, cy + a), fill=fg)
    else:  # textures fill a large patch with a pattern whose period scales with the image
        x0, y0 = w * rng.uniform(0, 0.15), h * rng.uniform(0, 0.15)
        x1, y1 = w * rng.uniform(0.85, 1.0), h * rng.uniform(0.85, 1.0)
        p = m / rng.uniform(5, 8)  # period in pixels
        if cls == "hstripes":
            for y in np.arange(y0, y1, p):
                d.rectangle((x0, y, x1, min(y + p / 2, y1)), fill=fg)
        elif cls == "vstripes":
            for x in np.arange(x0, x1, p):
                d.rectangle((x, y0, min(x + p / 2, x1), y1), fill=fg)
        elif cls == "checker":
            for i, y in enumerate(np.arange(y0, y1, p / 2)):
                for j, x in enumerate(np.arange(x0, x1, p / 2)):
                    if (i + j) % 2 == 0:
                        d.rectangle((x, y, min(x + p / 2, x1), min(y + p / 2, y1)), fill=fg)
        elif cls == "dots":
            rad = p * 0.25
            for y in np.arange(y0 + p / 2, y1, p):
                for x in np.arange(x0 + p / 2, x1, p):
                    d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=fg)
        else:
            raise ValueError(f"unknown demo class {cls!r}")
    return img


def generate(out: Path, seed: int = 0) -> None:
    for split_id, (split, n) in enumerate(PER_CLASS.items()):
        for c, cls in enumerate(CLASSES):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng((seed, split_id, c, i))
                render(cls, rng).save(folder / f"{i:04d}.jpg", quality=90)


def ensure_demo_dataset(root: Path | None = None) -> tuple[str, str]:
    """Return (train_dir, val_dir), generating the dataset first if it is not cached.

    Generated into a temp folder and renamed into place, so concurrent ranks or an
    interrupted run never leave a half-written dataset under the final name."""
    final = (root or cache_dir()) / VERSION
    if not (final / "val").is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}.", dir=final.parent))
        try:
            generate(tmp)
            os.rename(tmp, final)
        except OSError:
            if not (final / "val").is_dir():  # not a lost race with another rank
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final / "train"), str(final / "val")


if __name__ == "__main__":
    train, val = ensure_demo_dataset(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"demo dataset: train={train} val={val}")
