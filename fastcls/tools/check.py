"""`python -m fastcls.tools.check SPLIT [SPLIT ...]`: find undecodable images before training.

Every image under the ImageFolder root(s) or in the list file(s), or every row of Parquet /
Arrow files (a file, folder, glob or `save_to_disk` folder, as data.train names them; rows
are named `file.parquet:#row`), is decoded in full, in parallel worker processes.
Bad files are listed one per line as `path<TAB>reason`; the exit status is 1 when any was
found (0 when all decode, 2 for a usage/dataset error), so a batch script can stop before a
multi-day run. `--exclude-out FILE` writes the bad paths to FILE, one per line, which the
config key `data.exclude: FILE` then drops from every backend's file list.

Decoders: PIL always (what the native CPU path uses). `--strict` also decodes each file with
torchvision's libjpeg-turbo/libpng readers (`torchvision.io.decode_image`), which are
closer to nvJPEG/DALI/FFCV in what they refuse (e.g. PIL pads some truncated JPEGs that
libjpeg-turbo rejects).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Optional

from ..atomic import write_text_atomic
from ..data import open_split
from ..data.folder import index_split
from ..data.parquet import is_parquet
from ..data.sample import strict_error
from ..data.source import DatasetError


def check_file(path: str, strict: bool = False) -> Optional[str]:
    """Decode `path` fully; None when it decodes to a non-empty RGB image, else the reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return strict_error(raw, torchvision=strict)


def _check_one(args: tuple[str, bool]) -> tuple[str, Optional[str]]:
    path, strict = args
    return path, check_file(path, strict)


def _mapped(fn, jobs: list, workers: int, parallel: bool, progress: bool, unit: str, chunksize: int = 1):
    """fn(job) for each job, in order: in a pool of `workers` processes when `parallel`, with
    a progress bar when asked; the pool is shut down once the results are consumed."""
    pool = ProcessPoolExecutor(workers) if parallel else None
    try:
        results = pool.map(fn, jobs, chunksize=chunksize) if pool else map(fn, jobs)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), unit=unit, desc="check", file=sys.stderr)
        yield from results
    finally:
        if pool is not None:
            pool.shutdown()


def check_paths(paths: Iterable[str], workers: int = 0, strict: bool = False,
                progress: bool = False) -> list[tuple[str, str]]:
    """[(path, reason)] of the files that do not decode, in input order."""
    jobs = [(p, strict) for p in paths]
    workers = workers or os.cpu_count() or 1
    return [(p, why) for p, why in _mapped(_check_one, jobs, workers, workers > 1 and len(jobs) >= 64,
                                            progress, "img", chunksize=64) if why is not None]


def _check_rows(args) -> list[tuple[int, str, str]]:
    source, lo, hi, strict = args
    bad = []
    for sid in range(lo, hi):  # in order: each row group is read once
        raw = source.read(sid)
        why = raw.error or strict_error(raw.data, torchvision=strict)
        if why is not None:
            bad.append((sid, raw.name, why))
    return bad


def check_source(source, workers: int = 0, strict: bool = False,
                 progress: bool = False) -> list[tuple[int, str, str]]:
    """[(sample id, name, reason)] of the samples of a random-access Source that do not
    decode, in id order."""
    n, workers = source.num_samples, workers or os.cpu_count() or 1
    step = max(64, -(-n // (workers * 8)))
    jobs = [(source, lo, min(n, lo + step), strict) for lo in range(0, n, step)]
    return [b for part in _mapped(_check_rows, jobs, workers, workers > 1 and len(jobs) > 1, progress, "chunk")
            for b in part]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastcls.tools.check",
        description="Decode every image of ImageFolder root(s) or list file(s); list the ones "
                    "that fail.")
    ap.add_argument("roots", nargs="+", metavar="SPLIT",
                    help="ImageFolder root (DIR/<class>/*.jpg), list file ('path label' lines) or "
                         "Parquet / Arrow files")
    ap.add_argument("--root", default="", metavar="DIR",
                    help="list files: the folder their paths start from (as data.root)")
    ap.add_argument("--classes", default="", metavar="FILE",
                    help="list files: class names (as data.classes_file)")
    ap.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    ap.add_argument("--strict", action="store_true",
                    help="also decode with torchvision (libjpeg-turbo), as GPU decoders would")
    ap.add_argument("--exclude-out", metavar="FILE",
                    help="write the bad paths to FILE (use it as data.exclude)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    bad, total, rows = [], 0, set()  # rows: Parquet rows, which data.exclude cannot name
    for root in args.roots:
        if is_parquet(root):
            try:
                source = open_split(root)
            except DatasetError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            total += source.num_samples
            found = [(name, why) for _, name, why in
                     check_source(source, args.workers, args.strict, progress=not args.no_progress)]
            bad += found
            rows.update(name for name, _ in found)
            if found and args.exclude_out:
                print(f"warning: {root}: data.exclude does not apply to Parquet rows; they are "
                      f"counted and skipped as bad samples", file=sys.stderr)
            continue
        try:
            index = index_split(root, root, root=args.root, classes_file=args.classes)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name in index.empty_classes:
            print(f"warning: class folder {name!r} in {root} has no images", file=sys.stderr)
        total += len(index.samples)
        bad += check_paths((p for p, _ in index.samples), args.workers, args.strict,
                           progress=not args.no_progress)
    for path, why in bad:
        print(f"{path}\t{why}")
    if args.exclude_out:
        write_text_atomic(args.exclude_out, "".join(f"{os.path.abspath(p)}\n" for p, _ in bad
                                                    if p not in rows))
    print(f"checked {total} images: {len(bad)} bad" +
          (f"; wrote {args.exclude_out} (set data.exclude={args.exclude_out})"
           if args.exclude_out else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
