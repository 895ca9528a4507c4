"""Fused resized-crop kernel vs the per-image torch loop, on one ragged batch of decoded
uint8 images already on the device (decode excluded: this times only crop -> resize ->
flip -> normalize -> cast -> channels_last).

    python benchmarks/kernels.py                       # CUDA if available: Triton kernel
    python benchmarks/kernels.py --device cpu --batch 32 --size 224   # CPU: torch reference

Rows:
- fused:   kernels.resized_crop.resized_crop_normalize (Triton on CUDA, one launch; the
           torch reference on CPU) on the packed batch (packing copy included);
- loop:    what a per-image pipeline does: for each image `TF.resized_crop` + flip, then
           stack, float, normalize, channels_last.
Median of --repeats runs of --steps batches after --warmup; CUDA timed with synchronize.
Writes JSON (settings, machine, rows) to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastcls.data.base import MEAN, STD  # noqa: E402
from fastcls.data.batched import ANTIALIAS_ABOVE  # noqa: E402
from fastcls.data.sample import train_crop  # noqa: E402
from fastcls.kernels.resized_crop import build_params, pack_images, resized_crop_normalize, rrc_box  # noqa: E402


def make_batch(n: int, lo: int, hi: int, device: torch.device, seed: int = 0):
    """n random uint8 3×H×W images, H, W ~ U[lo, hi] (ImageNet: mean ~ 400×350)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return [torch.randint(0, 256, (3, int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))),
                          dtype=torch.uint8, generator=g).to(device) for _ in range(n)], rng


def fused(images, crops, flips, size, dtype, above):
    src, geom, _ = pack_images(images)
    geom, box = build_params(geom, *zip(*[rrc_box(*c, (size, size)) for c in crops]))
    return resized_crop_normalize(src, geom, box, torch.tensor(flips, dtype=torch.uint8), (size, size),
                                  MEAN, STD, dtype, above)


def loop(images, crops, flips, size, dtype, antialias: bool):
    out = []
    for im, c, f in zip(images, crops, flips):
        x = TF.resized_crop(im, *c, [size, size], antialias=antialias)
        out.append(x.flip(-1) if f else x)
    x = torch.stack(out).float()
    mean, std = _constants(x.device)
    return ((x - mean) / std).to(dtype, memory_format=torch.channels_last)


_CONSTANTS: dict = {}


def _constants(device: torch.device):
    """Mean and std on `device`, built once: a torch.tensor(...) per call would add two
    blocking host-to-device copies to the baseline and overstate the fused kernel's speedup."""
    if device not in _CONSTANTS:
        _CONSTANTS[device] = (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
                              torch.tensor(STD, device=device).view(1, 3, 1, 1))
    return _CONSTANTS[device]


def timed(fn, args, device) -> dict:
    for _ in range(args.warmup):
        fn()
    rates = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(args.steps * args.batch / (time.perf_counter() - t0))
    return {"img_per_s": statistics.median(rates), "runs": rates}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--min-side", type=int, default=250)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--antialias", default="auto", choices=tuple(ANTIALIAS_ABOVE))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="bench_out/kernels.json")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    above = ANTIALIAS_ABOVE[args.antialias]

    images, rng = make_batch(args.batch, args.min_side, args.max_side, device)
    drawn = [train_crop(im.shape[2], im.shape[1], rng, (0.08, 1.0), (3 / 4, 4 / 3), 0.5) for im in images]
    crops, flips = [c[:4] for c in drawn], [c.flip for c in drawn]
    # Agreement check, same filter on both sides (the loop cannot do "auto": compare "on").
    aa = args.antialias != "off"
    a = fused(images, crops, flips, args.size, torch.float32, ANTIALIAS_ABOVE["on" if aa else "off"])
    b = loop(images, crops, flips, args.size, torch.float32, aa)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
               "threads": torch.get_num_threads()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(complete: bool, **extra) -> None:  # after each row: a run cut short keeps it
        out.write_text(json.dumps({"benchmark": "kernels", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "complete": complete, "machine": machine, "settings": vars(args),
                                   "results": rows, **extra}, indent=2))

    rows = [{"impl": "fused " + ("triton" if device.type == "cuda" else "torch reference"),
             **timed(lambda: fused(images, crops, flips, args.size, dtype, above), args, device)}]
    write(False)
    rows.append({"impl": "per-image torch loop",
                 **timed(lambda: loop(images, crops, flips, args.size, dtype, args.antialias != "off"),
                         args, device)})
    rows[0]["speedup_vs_loop"] = rows[0]["img_per_s"] / rows[1]["img_per_s"]
    # torchvision's uint8 path rounds to integers: expect ~0.25 in 0..255 units
    diff = ((a.float() - b.float()) * torch.tensor(STD, device=device).view(1, 3, 1, 1)).abs()
    print(f"\nresized-crop kernel on {machine.get('gpu', 'CPU')}: batch {args.batch}, "
          f"{args.min_side}-{args.max_side} px -> {args.size} px, {args.dtype}, antialias={args.antialias}")
    print(f"{'impl':<28}{'img/s':>12}")
    for r in rows:
        print(f"{r['impl']:<28}{r['img_per_s']:>12.0f}")
    print(f"speedup {rows[0]['speedup_vs_loop']:.2f}x; mean |fused - loop| = {diff.mean().item():.3f} "
          f"(0..255 units, antialias {'on' if aa else 'off'} on both)")
    write(True, mean_abs_diff_vs_loop_255=diff.mean().item())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
