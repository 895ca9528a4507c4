"""Classify images with a checkpoint: top-k class names and probabilities per image.

    python -m fastcls.predict runs/demo/best.pt photo.jpg
    python -m fastcls.predict runs/demo/best.pt /d/unlabelled/ --topk 3 --out preds.jsonl
    python -m fastcls.predict runs/demo/best.pt list.txt --out preds.csv --batch-size 128
    python -m fastcls.predict resnet50-11ad3fa6.pth model.name=resnet50 cat.jpg

PATH: image files, folders (searched recursively for .jpg .jpeg .png .bmp .webp .tif .tiff),
text lists of image paths (.txt/.lst/.list, one per line, # comments; relative paths are
relative to the current directory), or Parquet / Arrow files as data.train names them (a
file, folder, glob or save_to_disk folder: every row, named `file.parquet:#row`). Images go
through the checkpoint's val transform (shorter
side to data.val_resize, center crop data.image_size: the native backend's, decoded by PIL in
--workers processes) in batches on the best device (CUDA when available; train.device=cpu to
force the CPU), with the checkpoint's train.amp. A file that cannot be read or decoded gets an
error line of its own; the others are still predicted. Output in input order: to stdout
(`path: class prob, ...`), or with --out as JSON lines (`{"path", "top": [{"class", "index",
"prob"}, ...]}` or `{"path", "error"}`) or CSV (path, class_1, prob_1, ..., error), chosen by
the suffix. Exit status: 0 when at least one image was classified, 1 when none, 2 on a bad
checkpoint or arguments.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .atomic import write_text_atomic
from .data import open_split
from .data.base import Normalizer, val_image_size
from .data.folder import IMAGE_EXTENSIONS
from .data.parquet import is_parquet
from .data.source import DatasetError
from .data.workers import decode_val
from .dist import pick_device
from .inference import USER_ERRORS, build_inference_model, checkpoint_parser, is_override, load_checkpoint
from .metrics import ranked_classes
from .train import amp_setup

LIST_SUFFIXES = (".txt", ".lst", ".list")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = checkpoint_parser("python -m fastcls.predict", __doc__)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="images, folders, text lists of paths; and section.key=value overrides")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", default=None, help="preds.jsonl or preds.csv (default: lines on stdout)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decode processes (default min(4, CPUs); 0 = in this process)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    args = p.parse_intermixed_args(argv)
    for name in ("topk", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.out and Path(args.out).suffix.lower() not in FORMATS:
        p.error(f"--out {args.out}: the suffix picks the format: {', '.join(FORMATS)}")
    return args


def expand(paths: list[str], rows: Optional[dict] = None) -> list[tuple[str, Optional[str]]]:
    """PATH arguments -> [(image path, error or None)], in order: folders walked (sorted),
    text lists read; a missing path or unreadable list is an entry with its error. With
    `rows` (a dict), Parquet / Arrow data becomes one entry per row, `file.parquet:#row`,
    and rows[name] = (its Source, sample id)."""
    out: list[tuple[str, Optional[str]]] = []
    for arg in paths:
        p = Path(arg)
        if rows is not None and is_parquet(arg):
            try:
                source = open_split(arg)
            except DatasetError as e:
                out.append((arg, str(e)))
                continue
            for sid in range(source.num_samples):
                name = source.name(sid)
                rows[name] = (source, sid)
                out.append((name, None))
        elif p.is_dir():
            found = sorted(str(f) for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.name.startswith("."))
            out.extend((f, None) for f in found)
            if not found:
                out.append((arg, "folder holds no images (" + " ".join(IMAGE_EXTENSIONS) + ")"))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            try:
                lines = p.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                out.append((arg, f"cannot read the list: {e}"))
                continue
            out.extend((ln.strip(), None) for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
        elif p.exists():
            out.append((arg, None))
        else:
            out.append((arg, "no such file or folder"))
    return out


class ImageFiles(Dataset):
    """Paths -> (uint8 crop×crop×3 tensor, error or ""): the val transform of the native
    backend (fastcls.data.workers.decode_val); a bad file yields zeros and its error."""

    def __init__(self, paths: list[str], size: int, resize: int, rows: Optional[dict] = None):
        self.paths, self.size, self.resize, self.rows = paths, size, resize, rows or {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        src = self.paths[i]
        try:
            if src in self.rows:  # a Parquet row: its screened bytes
                source, sid = self.rows[src]
                raw = source.read(sid)
                if raw.error:
                    return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), raw.error
                src = io.BytesIO(raw.data)
            return torch.from_numpy(decode_val(src, self.size, self.resize).copy()), ""
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def predict(model, paths: list[str], names: list[str], *, topk: int, size: int, resize: int,
            device: torch.device, autocast, batch_size: int, workers: int, rows: Optional[dict] = None
            ) -> Iterator[tuple[str, Optional[list[tuple[str, int, float]]], Optional[str]]]:
    """(path, [(class, index, probability)] * topk or None, error or None) per path, in
    order. Probabilities: softmax of the fp32 logits over all model outputs; the classes in
    the order of fastcls.metrics.ranked_classes (tied logits: lower class index first), the
    order fastcls.eval's top-1/top-5 and confusion matrix count."""
    workers = min(workers, math.ceil(len(paths) / batch_size))  # no idle processes to start
    loader = DataLoader(ImageFiles(paths, size, resize, rows), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    normalize = Normalizer(device, torch.float32)
    k = min(topk, len(names))
    done = 0
    with torch.no_grad():
        for images, errors in loader:
            with autocast():
                logits = model(normalize(images.permute(0, 3, 1, 2)))
            idx = ranked_classes(logits, k)  # evaluate()'s ranking and tie rule
            probs = logits.float().softmax(1).gather(1, idx)
            probs, idx = probs.cpu().tolist(), idx.cpu().tolist()  # sync: once per batch
            for j, err in enumerate(errors):
                path = paths[done + j]
                if err:
                    yield path, None, err
                else:
                    yield path, [(names[c], c, p) for c, p in zip(idx[j], probs[j])], None
            done += len(errors)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    overrides = [a for a in args.paths if is_override(a)]
    rows: dict = {}
    inputs = expand([a for a in args.paths if not is_override(a)], rows)
    try:
        loaded = load_checkpoint(args.checkpoint, overrides, ema=args.ema)
        device = pick_device(loaded.cfg.train.device)
        model = build_inference_model(loaded, device)
    except (*USER_ERRORS, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = loaded.cfg
    autocast, _ = amp_setup(cfg.train.amp, device)
    names = loaded.class_names()
    good = [p for p, err in inputs if err is None]
    results = {}
    if good:
        for path, top, err in predict(model, good, names, topk=args.topk, size=val_image_size(cfg.data),
                                      resize=cfg.data.val_resize, device=device, autocast=autocast,
                                      batch_size=args.batch_size, workers=args.workers, rows=rows):
            results[path] = (top, err)
            if not args.out:
                print(f"{path}: " + (f"error: {err}" if err else
                                     ", ".join(f"{c} {p:.4f}" for c, _, p in top)), flush=True)
    rows = [(p, *results[p]) if err is None else (p, None, err) for p, err in inputs]
    failed = sum(1 for _, top, _ in rows if top is None)
    if not args.out:
        for path, _, err in rows:  # the inputs that never reached the model
            if err is not None and path not in results:
                print(f"{path}: error: {err}")
    else:
        fmt = FORMATS[Path(args.out).suffix.lower()]
        text = to_jsonl(rows) if fmt == "jsonl" else to_csv(rows, min(args.topk, len(names)))
        write_text_atomic(args.out, text)
        print(f"wrote {len(rows) - failed} predictions to {args.out}"
              + (f" and {failed} errors (on their lines)" if failed else ""))
    if failed:
        print(f"WARNING: {failed} of {len(rows)} files could not be classified", file=sys.stderr)
    return 0 if failed < len(rows) else 1


def to_jsonl(rows) -> str:
    lines = []
    for path, top, err in rows:
        rec = {"path": path, "error": err} if top is None else \
            {"path": path, "top": [{"class": c, "index": i, "prob": p} for c, i, p in top]}
        lines.append(json.dumps(rec))
    return "\n".join(lines) + "\n"


def to_csv(rows, topk: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", *[f"{col}_{r}" for r in range(1, topk + 1) for col in ("class", "prob")], "error"])
    for path, top, err in rows:
        cells = [x for c, _, p in (top or []) for x in (c, f"{p:.6g}")]
        w.writerow([path, *cells, *[""] * (2 * topk - len(cells)), err or ""])
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
