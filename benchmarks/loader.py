"""Loader throughput: every available backend beside a PIL DataLoader baseline, same folder,
same process, no model. Prints a table and writes JSON.

    python benchmarks/loader.py --data /d/train --batch-size 256 --image-size 224 --workers 16
    python benchmarks/loader.py --demo --image-size 64        # the embedded demo data

The ffcv backend is measured on .beton copies of the folder in both write modes, jpg
(re-encoded JPEG, decoded by libjpeg-turbo) and raw (uint8 pixels, no decode); the
conversion is not timed and neither is the numba JIT (done when the loader is built).
`shards` is the native PIL-worker path reading a tar-shard copy of the folder (convert
--to wds, 64 MB shards, not timed) instead of the files: the same decode, other I/O;
`parquet` the same path reading a Parquet copy in Hugging Face's layout (written untimed
with pyarrow: `Image` struct, `ClassLabel` names, row groups of 100 rows as `datasets`
writes images, files of 10,000 rows).
img/s is the median over --repeats timed runs of --steps batches each, after --warmup
batches (worker start-up, numba/cudnn warm-up); on CUDA every timed run ends in a
synchronize. The ratio column is each backend over the baseline measured in this run,
which is the number to compare across machines.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastcls.config import BACKENDS, config_from_dict  # noqa: E402
from fastcls.data import DatasetError, build_loader, check_backend, scan_folder  # noqa: E402
from fastcls.tools.convert import convert_wds, ensure_beton  # noqa: E402

from common import dataset_info, hf_image_schema, machine_info, now_utc, versions, write_json  # noqa: E402

FFCV_MODES = ("jpg", "raw")  # .beton write modes measured for the ffcv backend
from fastcls.dist import pick_device  # noqa: E402


def pil_baseline(folder: str, args, device: torch.device):
    """What users run today: torchvision ImageFolder + transforms.v2 in DataLoader workers,
    float conversion and normalization in the workers, then a copy to the device."""
    import torchvision
    from torchvision.transforms import v2

    tf = v2.Compose([
        v2.RandomResizedCrop(args.image_size, antialias=True), v2.RandomHorizontalFlip(),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = torchvision.datasets.ImageFolder(folder, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, pin_memory=device.type == "cuda",
                                     persistent_workers=args.workers > 0)

    class Wrapped:
        def __len__(self):
            return len(dl)

        def set_epoch(self, e):
            pass

        def __iter__(self):
            for x, y in dl:
                yield (x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                       y.to(device, non_blocking=True))
    return Wrapped()


def parquet_copy(folder: str, out: str, rows_per_group: int = 100, rows_per_file: int = 10_000) -> str:
    """The folder's images as Parquet files under `out`, laid out as Hugging Face's `datasets`
    writes an image dataset (written here with pyarrow, so the benchmark needs no `datasets`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    idx = scan_folder(folder, key="--data")
    schema = hf_image_schema(idx.classes)
    Path(out).mkdir(parents=True, exist_ok=True)
    for f, lo in enumerate(range(0, len(idx.samples), rows_per_file)):
        rows = idx.samples[lo:lo + rows_per_file]
        table = pa.table({"image": pa.array([{"bytes": Path(p).read_bytes(), "path": Path(p).name}
                                             for p, _ in rows], schema.field("image").type),
                          "label": pa.array([lab for _, lab in rows], pa.int64())}, schema=schema)
        pq.write_table(table, f"{out}/train-{f:05d}.parquet", row_group_size=rows_per_group)
    return out


def time_loader(loader, args, device: torch.device) -> dict:
    """Median img/s over repeats; the loader is cycled through epochs as needed."""
    epoch = 0

    def batches():
        nonlocal epoch
        while True:
            loader.set_epoch(epoch)
            epoch += 1
            yield from loader

    it = batches()
    for _ in range(args.warmup):
        next(it)
    rates = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for _ in range(args.steps):
            x, _y = next(it)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return {"img_per_s": statistics.median(rates), "runs": rates}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="ImageFolder root (e.g. /d/train)")
    src.add_argument("--demo", action="store_true", help="use the embedded demo dataset")
    p.add_argument("--backends", default=",".join(
                       b for n in BACKENDS
                       for b in (("native:workers", "native:batched", "shards", "parquet")
                                 if n == "native" else (n,))),
                   help="comma list; unavailable ones are reported and skipped; native:workers|batched "
                        "picks data.native_decode (plain native = auto), native:batched:torchvision|"
                        "nvimgcodec also data.decoder; shards / parquet: native:workers over a "
                        "tar-shard / Parquet copy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the loaders' image dtype; auto: what training gets (bf16 under the "
                        "recipes' bf16 AMP on CUDA, fp32 on the CPU)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared machine')")
    p.add_argument("--out", default="bench_out/loader.json")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tree = {"model": {"num_classes": 1000},
            "data": {"batch_size": args.batch_size, "image_size": args.image_size,
                     "val_resize": max(args.image_size, round(args.image_size * 256 / 224)),
                     "workers": args.workers, "synthetic_images": args.batch_size * args.steps},
            "train": {"device": args.device}}
    if args.demo:
        from fastcls.tools.demo import ensure_demo_dataset
        folder = ensure_demo_dataset()[0]
    else:
        folder = args.data
    tree["data"]["train"] = folder
    try:
        scan_folder(folder, key="--data")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows, skipped = [], {}

    def result(complete: bool) -> dict:
        return {"benchmark": "loader", "time": now_utc(), "note": args.note, "complete": complete,
                "machine": machine_info(device), "versions": versions(), "settings": vars(args),
                "folder": folder, "dataset": dataset_info(folder), "results": rows, "skipped": skipped}

    tmp = tempfile.TemporaryDirectory(prefix="fastcls-bench-")
    betons, names = {}, args.backends.split(",")
    if "ffcv" in names:  # convert first: forking after numba's threads started warns
        try:
            check_backend("ffcv")
            betons = {m: ensure_beton(folder, f"{tmp.name}/{m}.beton", write_mode=m)
                      for m in FFCV_MODES}
        except DatasetError as e:
            skipped["ffcv"] = str(e)
            print(f"{'ffcv':>10}: skipped ({e})", file=sys.stderr)
            names.remove("ffcv")
    shards = None
    if "shards" in names:  # tar shards of the same files (WebDataset layout), written untimed
        shards = f"{tmp.name}/shards"
        convert_wds(folder, shards, shard_size="64MB", progress=False)
    pq_copy = None
    if "parquet" in names:  # the same files as Parquet (Hugging Face layout), written untimed
        try:
            import pyarrow.parquet  # noqa: F401
            pq_copy = parquet_copy(folder, f"{tmp.name}/parquet")
        except ImportError:
            skipped["parquet"] = "needs pyarrow: pip install 'fastcls[parquet]'"
            print(f"{'parquet':>10}: skipped ({skipped['parquet']})", file=sys.stderr)
            names.remove("parquet")
    for name in names:
        backend, _, rest = name.partition(":")   # native:batched:nvimgcodec
        decode, _, decoder = rest.partition(":")
        # (row label, data.train): ffcv reads the .beton copies (one per write mode), shards
        # the tar-shard copy (native PIL workers), every other backend the folder
        variants = [(name, folder)]
        if name == "ffcv":
            variants = [(f"ffcv ({m})", betons[m]) for m in FFCV_MODES]
        elif name == "shards":
            backend, decode, variants = "native", "workers", [("native:workers (shards)", shards)]
        elif name == "parquet":
            backend, decode, variants = "native", "workers", [("native:workers (parquet)", pq_copy)]
        for label, train in variants:
            tree["data"]["backend"] = backend
            tree["data"]["native_decode"] = decode or "auto"
            tree["data"]["decoder"] = decoder or "auto"
            tree["data"]["train"] = train
            try:
                cfg = config_from_dict(tree, "benchmark")
                loader = build_loader(cfg, "train", device, dtype=dtype)
            except DatasetError as e:
                skipped[name] = str(e)
                print(f"{name:>10}: skipped ({e})", file=sys.stderr)
                break
            decoder = getattr(loader, "decoder", None)  # the resolved batch decoder, if any
            rows.append({"backend": label, **({"decoder": decoder} if decoder else {}),
                         **time_loader(loader, args, device)})
            loader.close()  # its workers stop before the next backend's start
            write_json(args.out, result(False))  # each row as it comes: a cut run keeps it
    tree["data"]["train"] = folder
    if not args.no_baseline:
        rows.append({"backend": "pil_dataloader (baseline)",
                     **time_loader(pil_baseline(folder, args, device), args, device)})
    base = next((r["img_per_s"] for r in rows if r["backend"].startswith("pil_")), None)
    for r in rows:
        r["ratio_vs_pil"] = r["img_per_s"] / base if base else None

    print(f"\nloader throughput on {machine_info(device).get('gpu', 'CPU')} "
          f"({args.workers} workers, batch {args.batch_size}, {args.image_size}px)")
    print(f"{'backend':<28}{'img/s':>14}{'x PIL':>10}")
    for r in rows:
        ratio = f"{r['ratio_vs_pil']:.2f}" if r["ratio_vs_pil"] else "-"
        print(f"{r['backend']:<28}{r['img_per_s']:>14.0f}{ratio:>10}")
    out = write_json(args.out, result(True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
