"""Write a reproducible benchmark folder of ImageNet-like JPEGs (no download, no ImageNet).

    python benchmarks/make_jpegs.py --out /tmp/bench_jpegs --classes 10 --per-class 100
    python benchmarks/make_jpegs.py --out .probe_imgs --flat --count 400     # device probes
    python benchmarks/loader.py --data /tmp/bench_jpegs/train ...

What a decoder sees is what makes loader numbers comparable, so the files match ImageNet's
train set where it matters for decode cost, not its content:
- size: 60% have ImageNet's most common long side of 500 px at aspect 4:3, 3:2, 1:1 or 16:9
  (85% landscape), the rest a long side drawn from 200-800 px and an aspect from
  0.5-2.0; on average ~480x390 px (~190 kpx);
- bytes: ~110 KB on average (ImageNet train: ~110 KB) at quality 90, chroma 4:2:0;
- content: colour noise with a natural-image 1/f amplitude spectrum (exponent 0.9-1.25 per
  image; chroma weaker than luma), which gives JPEG's entropy coder the load of a photo;
- 3% grayscale (ImageNet has ~2% single-channel JPEGs, which loaders must expand to RGB).
Every image is drawn from its own generator seeded by (seed, index), so the same arguments
give the same pixels on any machine; the bytes also match where libjpeg is the same version
(`manifest.json` records a fingerprint of all files to compare).

Layout: OUT/train/cNNN/NNNNNN.jpg (ImageFolder, usable as `data.train`), plus OUT/val/...
with --val-per-class; with --flat, OUT/NNNNNN.jpg. OUT/manifest.json records the arguments
and the measured averages; a rerun with the same arguments finds it and writes nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 1           # bump when the generator changes what it writes
QUALITY = 90
GRAY_FRACTION = 0.03
COMMON_ASPECTS = (4 / 3, 3 / 2, 1.0, 16 / 9)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image, ImageNet-like (see the module docstring)."""
    if rng.random() < 0.6:
        long_side, aspect = 500, COMMON_ASPECTS[rng.integers(len(COMMON_ASPECTS))]
    else:
        long_side, aspect = int(rng.integers(200, 801)), float(np.exp(rng.uniform(0, np.log(2))))
    short_side = max(16, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.85 else (short_side, long_side)


def make_image(seed: int, index: int) -> tuple[bytes, dict]:
    """One JPEG's bytes and its facts; a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    w, h = image_size(rng)
    alpha = rng.uniform(0.9, 1.25)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** -alpha
    planes = []
    for weight in (1.0, 0.35, 0.35):  # Y, Cb, Cr: photos carry most detail in luma
        spec = amp * np.exp(2j * np.pi * rng.random(f.shape))
        spec[0, 0] = 0.0
        x = np.fft.irfft2(spec, s=(h, w))
        planes.append(x * (weight * 45.0 / (x.std() + 1e-12)))
    y, cb, cr = planes
    y = y + rng.uniform(90, 165)  # mean brightness varies per image
    rgb = np.stack([y + 1.402 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.772 * cb], axis=-1)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    gray = rng.random() < GRAY_FRACTION
    if gray:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=QUALITY, subsampling=2)  # 2 = 4:2:0
    data = buf.getvalue()
    return data, {"w": w, "h": h, "gray": gray, "bytes": len(data)}


def _write(job: tuple[int, int, str]) -> tuple[str, dict]:
    seed, index, path = job
    data, facts = make_image(seed, index)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest(), facts


def plan(args) -> list[tuple[int, str]]:
    """(global image index, relative path) of every file, in a fixed order."""
    if args.flat:
        return [(i, f"{i:06d}.jpg") for i in range(args.count)]
    jobs, i = [], 0
    for split, per in (("train", args.per_class), ("val", args.val_per_class)):
        for c in range(args.classes):
            for k in range(per):
                jobs.append((i, f"{split}/c{c:03d}/{k:06d}.jpg"))
                i += 1
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=100, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=0)
    p.add_argument("--flat", action="store_true", help="OUT/NNNNNN.jpg, no class folders")
    p.add_argument("--count", type=int, default=400, help="images with --flat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="rewrite even if the manifest matches")
    args = p.parse_args(argv)
    for key in ("classes", "per_class", "count", "workers"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.val_per_class < 0:
        p.error("--val-per-class must be >= 0")

    out = Path(args.out)
    request = {"version": VERSION, "seed": args.seed, "flat": args.flat,
               **({"count": args.count} if args.flat else
                  {"classes": args.classes, "per_class": args.per_class,
                   "val_per_class": args.val_per_class})}
    manifest = out / "manifest.json"
    if manifest.is_file() and not args.force:
        old = json.loads(manifest.read_text())
        if old.get("request") == request:
            print(f"{out}: already written ({old['images']} images, manifest matches)")
            return 0
        print(f"error: {out} holds another benchmark set ({old.get('request')}); "
              f"use another --out or --force", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty and has no manifest.json; use another --out or --force",
              file=sys.stderr)
        return 2

    jobs = plan(args)
    for d in {os.path.dirname(rel) for _, rel in jobs}:
        (out / d).mkdir(parents=True, exist_ok=True)
    work = [(args.seed, i, str(out / rel)) for i, rel in jobs]
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            done = pool.map(_write, work, chunksize=16)
    else:
        done = [_write(job) for job in work]

    facts = [f for _, f in done]
    n = len(facts)
    stats = {"images": n,
             "avg_width": round(sum(f["w"] for f in facts) / n, 1),
             "avg_height": round(sum(f["h"] for f in facts) / n, 1),
             "avg_kpixels": round(sum(f["w"] * f["h"] for f in facts) / n / 1000, 1),
             "avg_kbytes": round(sum(f["bytes"] for f in facts) / n / 1024, 1),
             "grayscale": sum(f["gray"] for f in facts),
             "quality": QUALITY, "subsampling": "4:2:0",
             # Same pixels everywhere; same bytes only with the same libjpeg build.
             "fingerprint": hashlib.sha256("".join(h for h, _ in done).encode()).hexdigest()[:16],
             "pillow": Image.__version__}
    manifest.write_text(json.dumps({"request": request, **stats}, indent=2))
    print(f"wrote {n} JPEGs to {out}: avg {stats['avg_width']:.0f}x{stats['avg_height']:.0f} px, "
          f"{stats['avg_kbytes']:.0f} KB, {stats['grayscale']} grayscale, "
          f"fingerprint {stats['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
