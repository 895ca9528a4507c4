"""Memory of the Parquet source's DataLoader workers on a multi-GB file set: does each
worker hold a copy of the dataset? Prints a table and writes JSON.

    python benchmarks/parquet_memory.py                  # 0.5 GB then 3 GB, 2 workers (minutes)
    python benchmarks/parquet_memory.py --gb 0.1,0.3 --out /tmp/pm.json     # smoke (seconds)

The data, written with pyarrow as Hugging Face lays out an image dataset (an `Image` struct
of bytes and path, a `ClassLabel` label, the features in the schema metadata, row groups of
--rows-per-group rows, files of --rows-per-file rows): --images distinct JPEGs of about
110 KB (ImageNet's mean size), each row's bytes made unique by a trailing row number (a JPEG
decoder stops at its end marker), until --gb gigabytes are written; each size of the --gb
list in turn, so the table shows whether a worker's memory grows with the data.

Measured over one training epoch on the batched path's byte workers (read + screen + header
+ crop draw in the workers; the batches are dropped in the main process, nothing is decoded,
so what is measured is the source's reading): each worker's Rss, Pss, Private_Dirty and
Anonymous (kB, /proc/PID/smaps_rollup) after its first batch and after the epoch's last.
Rss and Pss include the memory-mapped files' page cache (shared by every process, dropped
by the kernel under pressure); Anonymous is the worker's own memory, the number that would
grow with the dataset if a worker held a copy of it. The files are synced before the
measurement (see main). Also: the main
process's RSS growth while building the loader; the row groups a worker keeps (the
source's `_keep`) times the largest row group, the expected bound.

The JSON goes to benchmarks/results/memory/ (as table_memory.py's).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from table_memory import rss, smaps, workers_of  # noqa: E402

from fastcls.config import config_from_dict  # noqa: E402
from fastcls.data import build_loader  # noqa: E402

from common import device_slug, hf_image_schema, machine_info, now_utc, versions, write_json  # noqa: E402

CLASSES = 1000
MIB = 2**20


def jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct noisy JPEGs of 375x500 (~110 KB each at quality 90)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 255, (1, 1, 3)) + rng.integers(-40, 40, (375, 500, 3))
        buf = io.BytesIO()
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_parquet(root: Path, gb: float, images: int, rows_per_group: int, rows_per_file: int) -> tuple[int, int]:
    """Parquet files train-NNNNN.parquet under root in Hugging Face's layout -> (rows, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pool = jpegs(images)
    schema = hf_image_schema([f"n{c:08d}" for c in range(CLASSES)])
    target, written, row, f = int(gb * 1e9), 0, 0, 0
    while written < target:
        with pq.ParquetWriter(root / f"train-{f:05d}.parquet", schema) as w:
            for _ in range(0, rows_per_file, rows_per_group):
                blobs = [pool[(row + i) % len(pool)] + (row + i).to_bytes(8, "little")
                         for i in range(rows_per_group)]
                w.write_table(pa.table({
                    "image": pa.array([{"bytes": b, "path": f"{row + i}.jpg"} for i, b in enumerate(blobs)],
                                      schema.field("image").type),
                    "label": pa.array([(row + i) % CLASSES for i in range(rows_per_group)], pa.int64())},
                    schema=schema), row_group_size=rows_per_group)
                written += sum(map(len, blobs))
                row += rows_per_group
                if written >= target:
                    break
        f += 1
    return row, sum(p.stat().st_size for p in root.glob("*.parquet"))


def measure(root: Path, workers: int, batch_size: int, shuffle_buffer: int) -> dict:
    cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": CLASSES},
                            "data": {"train": str(root), "val": str(root), "batch_size": batch_size,
                                     "image_size": 32, "workers": workers,
                                     "parquet": {"shuffle_buffer": shuffle_buffer},
                                     "native_decode": "batched", "decoder": "torchvision"}})
    before = rss()
    loader = build_loader(cfg, "train", torch.device("cpu"))
    built = rss()
    source = loader.source
    import pyarrow.parquet as pq
    group_mb = max(pq.ParquetFile(f).metadata.row_group(i).total_byte_size
                   for f in source.files for i in range(pq.ParquetFile(f).metadata.num_row_groups)) / MIB
    loader.set_epoch(0)
    it = iter(loader.loader)  # the BatchedLoader's DataLoader: byte workers only, no decode here
    pids = workers_of(it)
    t0 = time.perf_counter()
    next(it)
    first = {p: smaps(p) for p in pids}
    batches, last = 1, first
    for _ in it:
        batches += 1
        if batches == len(loader):  # the last batch is in: read before the workers stop
            last = {p: smaps(p) for p in pids}
    seconds = time.perf_counter() - t0
    loader.close()
    per_worker = [{"pid": p, **{f"{k.lower()}_kb_{name}": snap[p].get(k) for name, snap in
                                (("first_batch", first), ("end", last)) for k in ("Rss", "Pss", "Private_Dirty", "Anonymous")}}
                  for p in pids]
    return {"main_rss_build_mb": round((built - before) / MIB, 1), "row_groups_kept_per_worker": source._keep,
            "largest_row_group_mb": round(group_mb, 1), "workers": per_worker,
            "epoch": {"batches": batches, "images": batches * batch_size, "seconds": round(seconds, 1),
                      "img_per_s": round(batches * batch_size / seconds)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", default="0.5,3", help="comma list: gigabytes of image bytes per data set; "
                   "each is written and measured in turn (a worker's memory must not grow with it)")
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs the rows cycle through")
    p.add_argument("--rows-per-group", type=int, default=100, help="Hugging Face datasets' default for images")
    p.add_argument("--rows-per-file", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=1024, help="data.parquet.shuffle_buffer")
    p.add_argument("--dir", help="write the files under here (default: a temp dir, deleted)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    base = Path(args.dir or tempfile.mkdtemp(prefix="fastcls-pq-"))
    runs = []
    try:
        for gb in [float(x) for x in args.gb.split(",")]:
            root = base / f"{gb:g}gb"
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            rows, nbytes = make_parquet(root, gb, args.images, args.rows_per_group, args.rows_per_file)
            write_s = time.perf_counter() - t0
            # Written back before measuring: a freshly written file's page-cache pages are
            # dirty, and smaps counts a dirty page mapped by one process as its Private_Dirty
            # (the workers memory-map the files): the page cache, not the worker's memory.
            os.sync()
            run = {"data": {"gb": gb, "rows": rows, "bytes_on_disk": nbytes,
                            "files": -(-rows // args.rows_per_file), "write_s": round(write_s, 1)},
                   **measure(root, args.workers, args.batch_size, args.shuffle_buffer)}
            runs.append(run)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'data':>18}{'worker':>8}" + "".join(f"{k + ' MiB':>18}" for k in ("Rss", "Pss", "Private_Dirty",
                                                                            "Anonymous"))
          + "   (first batch -> end of epoch)")
    for run in runs:
        d = run["data"]
        for w in run["workers"]:
            print(f"{d['bytes_on_disk'] / 1e9:>7.2f} GB {d['rows']:>7,}{w['pid']:>8}" + "".join(
                f"{w[f'{k}_kb_first_batch'] / 1024:>11.0f}->{w[f'{k}_kb_end'] / 1024:<5.0f}"
                for k in ("rss", "pss", "private_dirty", "anonymous")))
        print(f"{'':>18} one epoch of {run['epoch']['batches']} batches in {run['epoch']['seconds']} s "
              f"({run['epoch']['img_per_s']} img/s); main process +{run['main_rss_build_mb']} MiB "
              f"building the loader; each worker keeps {run['row_groups_kept_per_worker']} row groups "
              f"of at most {run['largest_row_group_mb']} MiB")
    result = {"benchmark": "parquet_memory", "time": now_utc(), "machine": machine_info(torch.device("cpu")),
              "versions": versions(), "settings": vars(args), "runs": runs}
    out = write_json(args.out or ROOT / "benchmarks" / "results" / "memory" / f"parquet-{device_slug(torch.device('cpu'))}.json",
                     result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
