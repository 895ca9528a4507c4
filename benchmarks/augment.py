"""Throughput of each on-device augmentation on one batch (default 256x3x224x224, the
guide's recipe parameters), alone, without loader or model. Prints a table, writes JSON.

    python benchmarks/augment.py                          # CUDA if available, else CPU
    python benchmarks/augment.py --device cpu --batch-size 64 --repeats 3

img/s is batch / median time of --repeats timed calls after --warmup calls; on CUDA each
call is timed with a synchronize before and after. The input is a normalized channels_last
batch of the loader's dtype (bf16 on CUDA, fp32 on CPU; --dtype to change).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastcls.augment import build_augmenter  # noqa: E402
from fastcls.config import load_config  # noqa: E402

RECIPES = ["autoaugment", "randaugment", "cutout", "random_erasing", "gridmask", "hide_and_seek",
           "mixup", "cutmix"]
ENABLE = {"mixup": ["augment.mixup.mixup_alpha=0.2"], "cutmix": ["augment.mixup.cutmix_alpha=0.2"],
          "mixup_cutmix_elem": ["augment.mixup.mixup_alpha=0.8", "augment.mixup.cutmix_alpha=1.0",
                                "augment.mixup.mode=elem"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="subset of: " + " ".join(RECIPES + ["mixup_cutmix_elem"]))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids OpenMP spin-wait on a busy machine")
    p.add_argument("--out", default="bench_out/augment.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    names = args.only or RECIPES + ["mixup_cutmix_elem"]
    n, s = args.batch_size, args.image_size
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randn(n, 3, s, s, generator=g, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (n,), generator=g, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = []
    for name in names:
        over = ENABLE.get(name, [f"augment.{name}.enabled=true"])
        cfg = load_config(ROOT / "pipelines" / "guide" / "resnet50_aug_baseline.yaml", over)
        aug = build_augmenter(cfg.augment, 1000, seed=0, rank=0)
        runs = []
        for i in range(args.warmup + args.repeats):
            sync()
            t0 = time.perf_counter()
            aug(images, labels, 0, i)
            sync()
            if i >= args.warmup:
                runs.append(time.perf_counter() - t0)
        med = statistics.median(runs)
        results.append({"augment": name, "img_per_s": n / med, "ms_per_batch": 1000 * med, "runs": runs})
        print(f"{name:20s} {n / med:12,.0f} img/s  {1000 * med:9.1f} ms/batch", flush=True)
    record = {"settings": {"batch_size": n, "image_size": s, "dtype": str(dtype), "device": str(dev),
                           "warmup": args.warmup, "repeats": args.repeats},
              "machine": {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                          else platform.processor() or platform.machine(),
                          "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
