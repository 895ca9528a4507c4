"""Host-side cost of feeding the GPU, per image, with the decoder and the crop kernel stubbed
out: what caps a GPU loader's speed once decoding runs on the GPU. Runs on any machine (no
GPU needed); prints a table and writes JSON.

    python benchmarks/host_feed.py                          # 512 make_jpegs images, batch 256 and 512
    python benchmarks/host_feed.py --data /d/train --batch-sizes 256

Measured, each the median of --repeats timed passes over --batches batches:
- `batched.worker_us_per_image`: a byte worker's work (fastcls/data/batched.py ByteBatch:
  read + screen + header + crop draw + the kernel's parameter rows), run in this process;
- `batched.main_us_per_image`: the main process's per-batch work (BatchedLoader._decode and
  _finish: the per-image views, the decode call, the size check, packing, the parameter
  copies, the kernel call), with the decoder returning ready 1x1 images (so packing costs
  its Python and dispatch, as on a GPU where the bytes move by an asynchronous device copy,
  not a host memcpy) and the kernel returning an empty batch;
- `dali.worker_us_per_image`: DALI's parallel external source callback (fastcls/data/dali.py
  DaliSource: read + screen + header + crop draw + the rows DALI takes), run in this process.
Each figure's implied ceiling is 1e6 / us per image per core (main: one core, the staging
threads; workers: per worker process).

Results go to benchmarks/results/host_feed/DATE_DEVICE_host_feed.json (the machine named in
it; not benchmarks/results/ itself, whose files table.py renders as loader/train rows).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastcls.config import config_from_dict  # noqa: E402
from fastcls.data import build_loader  # noqa: E402

from common import device_slug, machine_info, now_utc, versions, write_json  # noqa: E402


def timed(fn, n_images: int, repeats: int) -> dict:
    """Median us per image of `fn()` (one pass over n_images) over `repeats` passes."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) / n_images * 1e6)
    us = statistics.median(runs)
    return {"us_per_image": round(us, 2), "img_per_s_per_core": round(1e6 / us), "runs": [round(r, 2) for r in runs]}


def stub_decoder():
    """decode_batch's stand-in: each image a uint8 3×1×1 view of one buffer (see `measure_batched`)."""
    pixel = torch.zeros((3, 1, 1), dtype=torch.uint8)

    def decode(datas, device, nvdecoder=None, fallbacks=None, cpu_only=None):
        return [pixel] * len(datas), [None] * len(datas)  # the stub itself costs ~nothing
    return decode


def measure_batched(cfg, batches: int, repeats: int) -> dict:
    from fastcls.data import batched
    loader = build_loader(cfg, "train", torch.device("cpu"))
    loader.set_epoch(0)
    batches = min(batches, len(loader))
    n = batches * cfg.data.batch_size
    worker = timed(lambda: [loader.worker(0, g) for g in range(batches)], n, repeats)
    # The decoded images are 1x1 (the rows' header sizes set to match): packing then costs its
    # per-image Python and dispatch, as on a GPU, where the concatenation's bytes are an
    # asynchronous device copy, not the host memcpy a full-size CPU image would cost here.
    feds = [f._replace(hw=np.ones_like(f.hw)) for f in (loader.worker(0, g) for g in range(batches))]
    import fastcls.kernels.resized_crop as rc
    real_decode, real_kernel = batched.decode_batch, rc.resized_crop_normalize
    batched.decode_batch = stub_decoder()
    rc.resized_crop_normalize = lambda src, geom, box, flip, out_hw, *a, **k: \
        torch.empty((geom.shape[0], 3, *out_hw), dtype=torch.float32)
    try:
        main = timed(lambda: [loader._finish(loader._decode(f)) for f in feds], n, repeats)
    finally:
        batched.decode_batch, rc.resized_crop_normalize = real_decode, real_kernel
    loader.close()
    return {"main": main, "worker": worker}


def measure_dali(cfg, batches: int, repeats: int) -> dict:
    from fastcls.data import _spec, open_source
    from fastcls.data.dali import DaliSource
    spec = _spec(cfg, "train", cfg.data.train, torch.device("cpu"), cfg.data.batch_size)
    src = DaliSource(open_source(spec), spec, base_epoch=0, first_step=0, known_bad={})
    batches = min(batches, len(src.order))
    n = batches * cfg.data.batch_size
    info = [types.SimpleNamespace(epoch_idx=0, iteration=g) for g in range(batches)]
    return {"worker": timed(lambda: [src(i) for i in info], n, repeats)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageFolder root (default: 512 make_jpegs images in a temp dir)")
    p.add_argument("--batch-sizes", default="256,512")
    p.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tmp = None
    folder = args.data
    if folder is None:
        import make_jpegs
        tmp = tempfile.TemporaryDirectory(prefix="fastcls-hostfeed-")
        make_jpegs.main(["--out", tmp.name, "--classes", "4", "--per-class", "128"])
        folder = f"{tmp.name}/train"
    results, rows = {}, []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 1000},
                                "data": {"train": folder, "val": folder, "batch_size": bs,
                                         "image_size": args.image_size, "workers": 0,
                                         "native_decode": "batched", "decoder": "torchvision"}}, "host_feed")
        b = measure_batched(cfg, args.batches, args.repeats)
        results[f"batched.main_us_per_image@{bs}"] = b["main"]["us_per_image"]
        results[f"batched.worker_us_per_image@{bs}"] = b["worker"]["us_per_image"]
        rows += [("batched", "main", bs, b["main"]), ("batched", "worker", bs, b["worker"])]
        try:
            d = measure_dali(cfg, args.batches, args.repeats)
        except ImportError as e:
            print(f"dali: skipped ({e})", file=sys.stderr)
        else:
            results[f"dali.worker_us_per_image@{bs}"] = d["worker"]["us_per_image"]
            rows.append(("dali", "worker", bs, d["worker"]))
    device = torch.device("cpu")
    print(f"\nhost feed per image on {machine_info(device).get('cpu', 'CPU')} (decoder and kernel stubbed)")
    print(f"{'path':<10}{'side':<8}{'batch':>6}{'us/image':>10}{'img/s/core':>12}")
    for path, side, bs, r in rows:
        print(f"{path:<10}{side:<8}{bs:>6}{r['us_per_image']:>10.1f}{r['img_per_s_per_core']:>12,}")
    result = {"benchmark": "host_feed", "time": now_utc(), "note": args.note, "machine": machine_info(device),
              "versions": versions(), "settings": vars(args), "folder": folder, "results": results,
              "rows": [{"path": a, "side": s, "batch_size": bs, **r} for a, s, bs, r in rows]}
    out = write_json(args.out or ROOT / "benchmarks" / "results" / "host_feed" /
                     f"{now_utc()[:10]}_{device_slug(device)}_host_feed.json", result)
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
