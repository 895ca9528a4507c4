"""Convert an ImageFolder split into a dataset file for a backend that reads one.

    python -m fastcls.data.convert --to ffcv SRC_DIR OUT.beton [--write-mode jpg|raw|proportion]
        [--max-resolution 512] [--jpeg-quality 90] [--compress-probability 0.5] [--workers N]

FFCV (`--to ffcv`): one `.beton` with fields `image` (`RGBImageField`) and `label` (`IntField`,
the class index of `fastcls.data.folder.scan_folder`, so indices match the other backends),
plus `OUT.beton.json` next to it: the class list, sample count, write options and the
skipped files. Steps:

1. scan SRC_DIR as an ImageFolder (root/<class>/<image>); anything else is refused with a
   one-line message;
2. check every file decodes (PIL, DCT-downscaled: the entropy decoder still reads the whole
   file, so truncated/corrupt files fail) on all cores; undecodable files are skipped,
   counted and listed in the JSON, and the conversion fails when more than
   `--max-bad-fraction` of the files are bad;
3. write with FFCV's `DatasetWriter` (one forked process per core, tqdm progress bar) into
   `OUT.beton.tmp-<pid>`, then rename: a half-written file never carries the final name.

`DatasetWriter` forks its workers: a process that already ran an FFCV `Loader` (numba's
compile lock held by another thread) hangs there, so run conversions in their own process
(this CLI; `ensure_beton` below starts it as a subprocess).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .beton import FORMAT, META_SUFFIX, import_ffcv, meta_path
from .folder import DatasetError, read_exclude, scan_folder

WRITE_MODES = ("jpg", "raw", "proportion")
def _probe(path: str) -> Optional[str]:
    """None if `path` decodes, else "path: error". Cheap: JPEGs decode at 1/8 scale."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.convert("RGB").load()
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{path}: {type(e).__name__}: {e}"


class _FolderSamples:
    """Indexable (RGB uint8 H×W×3 array, label) for `DatasetWriter.from_indexed_dataset`.

    Runs inside the writer's forked workers. A worker that raises dies silently and FFCV's
    writer then waits forever for its samples, so a failure here (a file that passed the
    check but fails the full decode) is written to `err_path` and reported to the parent
    with SIGUSR1, which aborts the conversion with that message."""

    def __init__(self, samples: Sequence[tuple[str, int]], err_path: str):
        self.samples, self.err_path = list(samples), err_path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            return arr, label
        except Exception as e:
            with open(self.err_path, "a") as f:
                f.write(f"{path}: {type(e).__name__}: {e}\n")
            os.kill(os.getppid(), signal.SIGUSR1)
            time.sleep(3600)  # the parent terminates us


class _WorkerFailed(Exception):
    pass


def _on_worker_failure(signum, frame):
    raise _WorkerFailed()


def convert_ffcv(src: str, out: str, *, write_mode: str = "jpg", max_resolution: Optional[int] = None,
                 jpeg_quality: int = 90, compress_probability: float = 0.5, workers: int = 0,
                 max_bad_fraction: float = 0.01, chunksize: int = 100, progress: bool = True,
                 exclude: str = "") -> dict:
    """ImageFolder `src` -> `out` (.beton) + `out.json`; returns the metadata dict.

    Call it in a fresh process (see the module docstring). Raises DatasetError for bad input."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    if write_mode not in WRITE_MODES:
        raise DatasetError(f"--write-mode: unknown {write_mode!r}; valid: {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"--jpeg-quality: must be in 1..100, got {jpeg_quality}")
    if max_resolution is not None and max_resolution <= 0:
        raise DatasetError(f"--max-resolution: must be > 0, got {max_resolution}")
    skip = read_exclude(exclude)
    try:
        index = scan_folder(src, key="SRC_DIR", exclude=skip)
    except DatasetError as e:
        raise DatasetError(f"{e}. --to ffcv converts an ImageFolder split: "
                           f"SRC_DIR/<class>/<image>.jpg (e.g. imagenet/train)") from None
    out_p = Path(out)
    if out_p.suffix != ".beton":
        raise DatasetError(f"OUT: expected a file name ending in .beton, got {out!r}")
    if out_p.is_dir():
        raise DatasetError(f"OUT: {out!r} is a directory")
    out_p.parent.mkdir(parents=True, exist_ok=True)
    workers = workers if workers > 0 else (os.cpu_count() or 1)

    # 1. decodability check on all cores (fork, like the writer: run in a fresh process)
    paths = [p for p, _ in index.samples]
    with mp.get_context("fork").Pool(workers) as pool:
        results = list(tqdm(pool.imap(_probe, paths, chunksize=16), total=len(paths),
                            desc="checking", disable=not progress, file=sys.stderr))
    bad = [r for r in results if r is not None]
    good = [s for s, r in zip(index.samples, results) if r is None]
    if len(bad) > max_bad_fraction * len(paths) or not good:
        shown = "\n  ".join(bad[:20])
        raise DatasetError(f"{len(bad)} of {len(paths)} files under {src!r} do not decode, more "
                           f"than --max-bad-fraction={max_bad_fraction} allows:\n  {shown}")
    if bad:
        print(f"convert: skipping {len(bad)} undecodable files (listed in {meta_path(out_p)}): "
              f"{bad[:3]}", file=sys.stderr)

    # 2. write under a temporary name, then rename
    tmp = out_p.with_name(f"{out_p.name}.tmp-{os.getpid()}")
    err = Path(f"{tmp}.err")
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField()}
    writer = DatasetWriter(str(tmp), fields, num_workers=workers)
    old = signal.signal(signal.SIGUSR1, _on_worker_failure)
    try:
        writer.from_indexed_dataset(_FolderSamples(good, str(err)), chunksize=chunksize)
    except BaseException as e:  # incl. Ctrl-C: stop the workers, remove the partial file
        for child in mp.active_children():
            child.terminate()
        shm = getattr(writer, "metadata_sm", None)
        if shm is not None and not isinstance(shm, int):  # FFCV sets it to 3 before creating it
            shm.close()
            shm.unlink()
        tmp.unlink(missing_ok=True)
        if not isinstance(e, _WorkerFailed):
            raise
        msg = err.read_text().strip() if err.exists() else "a writer process failed"
        raise DatasetError(f"conversion of {src!r} failed, {out!r} not written: {msg}") from None
    finally:
        signal.signal(signal.SIGUSR1, old)
        err.unlink(missing_ok=True)
    meta = {"format": FORMAT, "classes": index.classes, "empty_classes": index.empty_classes,
            "num_samples": len(good), "source": str(Path(src).resolve()), "write_mode": write_mode,
            "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
            "compress_probability": compress_probability, "skipped": bad}
    mtmp = Path(f"{tmp}{META_SUFFIX}")
    mtmp.write_text(json.dumps(meta, indent=1))
    os.replace(mtmp, meta_path(out_p))   # metadata first: a .beton under its final name
    os.replace(tmp, out_p)               # always has its class list next to it
    return meta


def ensure_beton(src: str, out: str, *, write_mode: str = "jpg", workers: int = 0) -> str:
    """`out` if it exists, else convert `src` into it in a separate process (so that FFCV's
    forking writer never runs in a process that holds a Loader). Returns `out`."""
    if Path(out).is_file() and meta_path(out).is_file():
        return out
    cmd = [sys.executable, "-m", "fastcls.data.convert", "--to", "ffcv", src, out,
           "--write-mode", write_mode, "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DatasetError(f"converting {src} to {out} failed: {proc.stderr.strip()[-2000:]}")
    return out


def _cleanup_stale(out: Path) -> None:
    """Remove temporaries of conversions that were killed (their pid is gone)."""
    for p in out.parent.glob(f"{out.name}.tmp-*"):
        pid = p.name.split(".tmp-")[1].split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            p.unlink(missing_ok=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcls.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=("ffcv",), help="output format")
    p.add_argument("src", help="ImageFolder split: SRC/<class>/<image>")
    p.add_argument("out", help="output file (OUT.beton)")
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES,
                   help="jpg: re-encode as JPEG (small, decode cost); raw: uint8 pixels (large, "
                        "fastest); proportion: each image jpg with --compress-probability")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="downscale so the longer side is at most this (default: keep)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="--write-mode proportion: fraction of images stored as JPEG")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of the files do not decode")
    p.add_argument("--exclude", default="", metavar="FILE",
                   help="skip the images listed in FILE (as data.exclude; written by "
                        "python -m fastcls.data.check --exclude-out)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    _cleanup_stale(out)
    t0 = time.perf_counter()
    try:
        meta = convert_ffcv(args.src, args.out, write_mode=args.write_mode,
                            max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                            compress_probability=args.compress_probability, workers=args.workers,
                            max_bad_fraction=args.max_bad_fraction, progress=not args.no_progress,
                            exclude=args.exclude)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({meta['num_samples']} images, {len(meta['classes'])} classes, "
          f"{size:.1f} MiB, {args.write_mode}) + {meta_path(out).name} in "
          f"{time.perf_counter() - t0:.1f} s; skipped {len(meta['skipped'])} undecodable files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
