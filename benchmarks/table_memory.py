"""Memory of the sample table at ImageNet scale: a PaddleClas list file of --n lines read
into the list/folder Source, and what the DataLoader workers forked from it copy over one
full epoch. Prints a table and writes JSON.

    python benchmarks/table_memory.py                     # 1,281,167 lines, 2 workers (minutes)
    python benchmarks/table_memory.py --n 20000 --out /tmp/tm.json    # smoke (seconds)

The data: --n hard links (os.link) to a tiny real JPEG (64x48; one copy per class, as ext4
allows 65,000 links per file) in 1,000 class folders `n%08d/n%08d_%d.JPEG` under --dir
(default: a temp dir, deleted at the end unless --keep), and the list file with paths
relative to it, so every line names a file that exists (the list reader lists each folder
once).

Measured:
- main process: `source.table.nbytes` (paths in one byte buffer + offsets + int64 labels),
  RSS before and after building the loader (the reader's temporaries are freed but malloc
  may keep them: RSS after malloc_trim(0) is shown too), and the peak RSS;
- each DataLoader worker of the batched path (byte workers: read + screen + header + crop
  draw; nothing is decoded in the main process, batches are dropped): Private_Dirty (kB)
  from /proc/PID/smaps_rollup right after the fork, after the first batch, and after the
  epoch's last batch; the growth over the epoch is last - first batch. A page is private to
  a worker once it wrote to it (copy-on-write: a refcount touched) or once the parent wrote
  its own copy of it, so this is an upper bound on what the worker copied;
- for comparison, the layout before the table: a Python list of (absolute path, label)
  tuples of the same lines (tracemalloc), which forked workers copy page by page as they
  touch the reference counts (pytorch/pytorch#13246).

The JSON goes to benchmarks/results/memory/ (not benchmarks/results/: table.py renders the
loader/train results there and refuses other shapes).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import io
import os
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastcls.config import config_from_dict  # noqa: E402
from fastcls.data import build_loader  # noqa: E402

from common import device_slug, machine_info, now_utc, versions, write_json  # noqa: E402

CLASSES = 1000
MIB = 2**20


def tiny_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def make_data(root: Path, n: int) -> Path:
    """n hard links to one JPEG in CLASSES folders and the list file naming them."""
    jpeg = tiny_jpeg()
    (root / "src").mkdir(exist_ok=True)
    for c in range(CLASSES):  # one source file per class: a file takes at most 65,000 links (ext4)
        (root / f"n{c:08d}").mkdir(exist_ok=True)
        (root / "src" / f"{c}.jpg").write_bytes(jpeg)
    lst = root / "train_list.txt"
    with open(lst, "w") as f:
        lines = []
        for i in range(n):
            c = i * CLASSES // n  # sorted by class, as ImageNet's list is
            rel = f"n{c:08d}/n{c:08d}_{i}.JPEG"
            dst = root / rel
            if not dst.exists():
                os.link(root / "src" / f"{c}.jpg", dst)
            lines.append(f"{rel} {c}\n")
            if len(lines) == 65536:
                f.write("".join(lines))
                lines = []
        f.write("".join(lines))
    return lst


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def malloc_trim() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def smaps(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            out[key] = int(parts[0])
    return out


PAGE = os.sysconf("SC_PAGE_SIZE")


def table_pages(pid: int, arrays) -> dict[str, int]:
    """Pages of the table's arrays in process `pid` (the same addresses in a forked child):
    how many are resident and how many exclusively mapped (/proc/PID/pagemap bit 56), i.e.
    a copy of its own: a page still shared with the parent is not exclusive."""
    total = present = exclusive = 0
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for a in arrays:
            first, last = a.ctypes.data // PAGE, (a.ctypes.data + a.nbytes - 1) // PAGE
            f.seek(first * 8)
            v = np.frombuffer(f.read((last - first + 1) * 8), np.uint64)
            total += len(v)
            on = (v >> np.uint64(63)) & np.uint64(1) == 1
            present += int(on.sum())
            exclusive += int((on & ((v >> np.uint64(56)) & np.uint64(1) == 1)).sum())
    return {"table_pages": total, "table_pages_resident": present, "table_pages_exclusive": exclusive}


def workers_of(it) -> list[int]:
    """The DataLoader iterator's worker pids, found among this process's children."""
    want = {w.pid for w in getattr(it, "_workers", [])}
    kids = [p.pid for p in psutil.Process().children()]
    return [p for p in kids if p in want] if want else kids


def measure_table(lst: Path, workers: int, freeze: bool = False) -> dict:
    cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": CLASSES},
                            "data": {"train": str(lst), "val": str(lst), "batch_size": 256,
                                     "image_size": 32, "workers": workers,
                                     "native_decode": "batched", "decoder": "torchvision"}})
    gc.collect()
    malloc_trim()
    before = rss()
    t0 = time.perf_counter()
    loader = build_loader(cfg, "train", torch.device("cpu"))
    build_s = time.perf_counter() - t0
    after = rss()
    peak = peak_rss()
    gc.collect()
    trimmed = rss() if malloc_trim() else None
    source = loader.source
    table = {"samples": len(source.table), "nbytes": source.table.nbytes,
             "blob_bytes": source.table.blob.nbytes, "offsets_bytes": source.table.offsets.nbytes,
             "labels_bytes": source.table.labels.nbytes}
    main = {"rss_before": before, "rss_after_build": after, "rss_after_build_trimmed": trimmed,
            "rss_delta": after - before,
            "rss_delta_trimmed": None if trimmed is None else trimmed - before,
            "peak_rss": peak, "build_s": round(build_s, 2)}

    arrays = (source.table.blob, source.table.offsets, source.table.labels)

    def snap(pids):
        return {p: smaps(p) | table_pages(p, arrays) for p in pids}

    loader.set_epoch(0)
    if freeze:  # the objects made so far leave the cyclic GC's reach: its passes write no page of them
        gc.collect()
        gc.freeze()
    it = iter(loader.loader)  # the BatchedLoader's DataLoader: byte workers only, no decode here
    pids = workers_of(it)
    at_fork = snap(pids)
    t0 = time.perf_counter()
    next(it)
    first = snap(pids)
    batches = 1
    last = first
    for _ in it:
        batches += 1
        if batches == len(loader):  # the last batch is in: read before the workers stop
            last = snap(pids)
            main_pages = table_pages(os.getpid(), arrays)
    epoch_s = time.perf_counter() - t0
    if freeze:
        gc.unfreeze()
    loader.close()
    per_worker = []
    for p in pids:
        row = {"pid": p}
        for name, snap in (("at_fork", at_fork), ("first_batch", first), ("end", last)):
            s = snap.get(p, {})
            row[f"private_dirty_kb_{name}"] = s.get("Private_Dirty")
            row[f"pss_kb_{name}"] = s.get("Pss")
            row[f"rss_kb_{name}"] = s.get("Rss")
            row[f"table_pages_exclusive_{name}"] = s.get("table_pages_exclusive")
        row["table_pages"] = last[p]["table_pages"]
        row["private_dirty_growth_kb"] = row["private_dirty_kb_end"] - row["private_dirty_kb_first_batch"]
        per_worker.append(row)
    epoch = {"batches": batches, "images": batches * 256, "seconds": round(epoch_s, 1),
             "img_per_s": round(batches * 256 / epoch_s, 0)}
    main["table_pages_exclusive_at_epoch_end"] = main_pages["table_pages_exclusive"]
    return {"table": table, "main": main, "workers": per_worker, "epoch": epoch}


def measure_tuples(lst: Path) -> dict:
    """The old layout: [(absolute path, label)] of the same lines, as the old reader built it."""
    base = str(lst.parent.resolve())
    gc.collect()
    malloc_trim()
    before = rss()
    tracemalloc.start()
    samples = []
    with open(lst) as f:
        for line in f:
            rel, lab = line.rsplit(None, 1)
            samples.append((os.path.normpath(os.path.join(base, rel)), int(lab)))
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"samples": len(samples), "tracemalloc_bytes": traced, "rss_delta": rss() - before}
    del samples
    return out


def machine_slug() -> str:
    return device_slug(torch.device("cpu"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_281_167, help="list lines (ImageNet train: 1,281,167)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the batched path")
    p.add_argument("--dir", default="", help="work dir for the links and the list (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (a rerun reuses its links)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() before the workers fork (what the growth is without the GC's writes)")
    p.add_argument("--no-tuples", action="store_true", help="skip the list-of-tuples comparison")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/memory/"
                                              "table_memory-<machine>.json)")
    args = p.parse_args(argv)
    if args.n < 256 * max(1, args.workers):
        p.error("--n must hold at least one batch of 256 per worker")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fastcls-table-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        lst = make_data(work, args.n)
        make_s = time.perf_counter() - t0
        r = measure_table(lst, args.workers, args.gc_freeze)
        r["tuples"] = None if args.no_tuples else measure_tuples(lst)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    t, m, e = r["table"], r["main"], r["epoch"]
    print(f"{t['samples']:,} list lines, {args.workers} byte workers (batched path), data made in {make_s:.0f} s")
    print(f"table: {t['nbytes'] / MIB:.1f} MiB (paths {t['blob_bytes'] / MIB:.1f}, offsets "
          f"{t['offsets_bytes'] / MIB:.1f}, labels {t['labels_bytes'] / MIB:.1f})")
    trim = "" if m["rss_after_build_trimmed"] is None else \
        f", {m['rss_after_build_trimmed'] / MIB:.0f} MiB after malloc_trim"
    print(f"main RSS: {m['rss_before'] / MIB:.0f} MiB before, {m['rss_after_build'] / MIB:.0f} MiB "
          f"after building the loader ({m['build_s']:.1f} s){trim}; peak {m['peak_rss'] / MIB:.0f} MiB")
    print(f"epoch: {e['batches']:,} batches in {e['seconds']:.0f} s ({e['img_per_s']:,.0f} img/s)")
    print(f"| worker | Private_Dirty at fork | after batch 1 | at epoch end | growth over the epoch | "
          f"table pages copied at the end{' (gc.freeze)' if args.gc_freeze else ''} |")
    print("|---|---|---|---|---|---|")
    for i, w in enumerate(r["workers"]):
        print(f"| {i} | {w['private_dirty_kb_at_fork'] / 1024:.1f} MiB | "
              f"{w['private_dirty_kb_first_batch'] / 1024:.1f} MiB | {w['private_dirty_kb_end'] / 1024:.1f} MiB | "
              f"{w['private_dirty_growth_kb'] / 1024:+.1f} MiB | "
              f"{w['table_pages_exclusive_end']:,} of {w['table_pages']:,} |")
    if r["tuples"]:
        tu = r["tuples"]
        print(f"old layout, list of (path, label) tuples: {tu['tracemalloc_bytes'] / MIB:.0f} MiB "
              f"(tracemalloc; RSS +{tu['rss_delta'] / MIB:.0f} MiB) vs the table's "
              f"{t['nbytes'] / MIB:.1f} MiB")

    result = {"benchmark": "table_memory", "time": now_utc(), "machine": machine_info(torch.device("cpu")),
              "versions": versions(),
              "settings": {"n": args.n, "classes": CLASSES, "workers": args.workers, "batch_size": 256,
                           "image_size": 32, "native_decode": "batched", "decoder": "torchvision",
                           "image": "64x48 JPEG, hard-linked", "make_data_s": round(make_s, 1),
                           "gc_freeze": args.gc_freeze},
              **r}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "memory" / \
        f"table_memory-{machine_slug()}{'-gc-freeze' if args.gc_freeze else ''}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
