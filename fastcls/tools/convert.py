"""Convert an ImageFolder split or a list file into the dataset files of another format.

    python -m fastcls.tools.convert --to ffcv SRC_SPLIT OUT.beton [--write-mode jpg|raw|proportion]
        [--max-resolution 512] [--jpeg-quality 90] [--compress-probability 0.5] [--workers N]
    python -m fastcls.tools.convert --to wds SRC_SPLIT OUT_DIR [--shard-size 1GB | --per-shard N]
        [--seed 0] [--prefix NAME]

SRC_SPLIT is an ImageFolder root (SRC/<class>/<image>), a PaddleClas list file
("relative/path label" per line; `--root DIR` for its paths, `--classes FILE` for its class
names, as data.root / data.classes_file), or Parquet / Arrow files as data.train names them
(a file, folder, glob or brace pattern, a save_to_disk folder; fastcls/data/parquet.py): their
rows are checked by a full decode and written in row-group order (shards: the row groups
shuffled, then the rows within each), so each row group is read once per pass.

Shards (`--to wds`): see convert_wds below and fastcls/data/shards.py for the layout.

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
import io
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..data.beton import FORMAT, META_SUFFIX, import_ffcv, meta_path
from ..data.folder import FolderIndex, index_split, read_exclude
from ..data.parquet import _SPLIT_FILE, is_parquet
from ..data.sample import image_format
from ..data.source import DatasetError

WRITE_MODES = ("jpg", "raw", "proportion")
# sample.image_format -> the tar member's extension (a Parquet row's bytes carry no file name)
_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}
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


class _SourceSamples(_FolderSamples):
    """`_FolderSamples` over the rows `sids` of a random-access Source (Parquet / Arrow)."""

    def __init__(self, source, sids: Sequence[int], err_path: str):
        self.source, self.sids, self.err_path = source, list(sids), err_path

    def __len__(self) -> int:
        return len(self.sids)

    def __getitem__(self, i: int):
        raw = self.source.read(self.sids[i])
        try:
            if raw.error:
                raise ValueError(raw.error)
            with Image.open(io.BytesIO(raw.data)) as im:
                return np.asarray(im.convert("RGB")), raw.label
        except Exception as e:
            with open(self.err_path, "a") as f:
                f.write(f"{raw.name}: {type(e).__name__}: {e}\n")
            os.kill(os.getppid(), signal.SIGUSR1)
            time.sleep(3600)  # the parent terminates us


def _rows(src: str, source, workers: int, progress: bool, max_bad_fraction: float, listed_in: str):
    """The rows of Parquet / Arrow `src` (its `source`) -> (the ids of the rows that decode, in
    id order, ["name: reason"] of those that do not); every row decoded in full on all cores."""
    from .check import check_source
    bad = check_source(source, workers, progress=progress)
    samples = [(sid, int(source.labels[sid])) for sid in range(source.num_samples)]
    good, skipped = _keep_decodable(samples, [f"{name}: {why}" for _, name, why in bad],
                                    {sid for sid, _, _ in bad}, src, max_bad_fraction, listed_in)
    return [sid for sid, _ in good], skipped


def _rows_prefix(src: str, source) -> str:
    """The shard prefix of Parquet / Arrow `src`: a folder's name, else the first file's
    split name (train-00000-of-00004.parquet -> train)."""
    if os.path.isdir(src):
        name = Path(src).resolve().name
    else:
        first = os.path.basename(source.files[0])
        m = _SPLIT_FILE.match(first)
        name = m.group(1) if m else Path(first).stem
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", name).lstrip(".") or "data"


class _WorkerFailed(Exception):
    pass


def _on_worker_failure(signum, frame):
    raise _WorkerFailed()


def _keep_decodable(samples, bad: list[str], bad_paths: set, src: str, max_bad_fraction: float,
                    listed_in: str) -> tuple[list, list[str]]:
    """(the samples that decode, the "path: reason" of those that do not); a DatasetError
    when more than `max_bad_fraction` of the files are bad (or none is good)."""
    good = [s for s in samples if s[0] not in bad_paths]
    if len(bad) > max_bad_fraction * len(samples) or not good:
        shown = "\n  ".join(bad[:20])
        raise DatasetError(f"{len(bad)} of {len(samples)} files of {src!r} do not decode, more "
                           f"than --max-bad-fraction={max_bad_fraction} allows:\n  {shown}")
    if bad:
        print(f"convert: skipping {len(bad)} undecodable files (listed in {listed_in}): "
              f"{bad[:3]}", file=sys.stderr)
    return good, bad


def convert_ffcv(src: str, out: str, *, write_mode: str = "jpg", max_resolution: Optional[int] = None,
                 jpeg_quality: int = 90, compress_probability: float = 0.5, workers: int = 0,
                 max_bad_fraction: float = 0.01, chunksize: int = 100, progress: bool = True,
                 exclude: str = "", root: str = "", classes_file: str = "") -> dict:
    """ImageFolder, list file or Parquet / Arrow files `src` -> `out` (.beton) + `out.json`;
    returns the metadata.

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
    rows, index = _rows_or_index(src, exclude, root, classes_file, "ffcv")
    out_p = Path(out)
    if out_p.suffix != ".beton":
        raise DatasetError(f"OUT: expected a file name ending in .beton, got {out!r}")
    if out_p.is_dir():
        raise DatasetError(f"OUT: {out!r} is a directory")
    out_p.parent.mkdir(parents=True, exist_ok=True)
    workers = workers if workers > 0 else (os.cpu_count() or 1)

    # 1. decodability check on all cores (fork, like the writer: run in a fresh process)
    if rows:
        from ..data import open_split
        source = open_split(src)
        sids, bad = _rows(src, source, workers, progress, max_bad_fraction, str(meta_path(out_p)))
        classes, empty_classes, good = source.classes, source.empty_classes, sids
    else:
        paths = [p for p, _ in index.samples]
        with mp.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_probe, paths, chunksize=16), total=len(paths),
                                desc="checking", disable=not progress, file=sys.stderr))
        good, bad = _keep_decodable(index.samples, [r for r in results if r is not None],
                                    {p for p, r in zip(paths, results) if r is not None}, src,
                                    max_bad_fraction, str(meta_path(out_p)))
        classes, empty_classes = index.classes, index.empty_classes

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
        samples = _SourceSamples(source, good, str(err)) if rows else _FolderSamples(good, str(err))
        writer.from_indexed_dataset(samples, chunksize=chunksize)
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
    meta = {"format": FORMAT, "classes": classes, "empty_classes": empty_classes,
            "num_samples": len(good), "source": str(Path(src).resolve()), "write_mode": write_mode,
            "max_resolution": max_resolution, "jpeg_quality": jpeg_quality,
            "compress_probability": compress_probability, "skipped": bad}
    mtmp = Path(f"{tmp}{META_SUFFIX}")
    mtmp.write_text(json.dumps(meta, indent=1))
    os.replace(mtmp, meta_path(out_p))   # metadata first: a .beton under its final name
    os.replace(tmp, out_p)               # always has its class list next to it
    return meta


def _rows_or_index(src: str, exclude: str, root: str, classes_file: str, to: str
                   ) -> tuple[bool, Optional[FolderIndex]]:
    """(src names Parquet/Arrow rows, else the folder/list index of src)."""
    if is_parquet(src):
        if exclude:
            raise DatasetError("--exclude applies to folders and list files; Parquet rows that do not "
                               "decode are skipped and listed")
        return True, None
    return False, _source_index(src, exclude, root, classes_file, to)


def _source_index(src: str, exclude: str, root: str, classes_file: str, to: str) -> FolderIndex:
    try:
        return index_split(src, "SRC_SPLIT", exclude=read_exclude(exclude), root=root,
                           classes_file=classes_file)
    except DatasetError as e:
        raise DatasetError(f"{e}. --to {to} converts an ImageFolder split "
                           f"(SRC/<class>/<image>.jpg, e.g. imagenet/train) or a list file") from None


def parse_size(text: str) -> int:
    """'1GB', '500MB', '1.5GiB', '1e9' -> bytes (KB/MB/GB/TB decimal, KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    try:
        value = float(m.group(1)) if m else -1.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DatasetError(f"--shard-size: expected a size such as 1GB, 500MB or 2GiB, got {text!r}")
    unit = (1024 if m.group(3) else 1000) ** " KMGT".index((m.group(2) or " ").upper())
    return int(value * unit)


def _sample_keys(index: FolderIndex, good: Sequence[tuple[str, int]]) -> list[str]:
    """A tar key per sample, from its path under the root (the file name's dots, which
    WebDataset reads as extension separators, become '_'); unique (a counter when two
    paths map to one key); numbered when the path is too long for a ustar header."""
    keys, seen = [], set()
    for i, (path, _) in enumerate(good):
        rel = os.path.relpath(path, index.root)
        if rel.startswith(".."):
            rel = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
        d, base = os.path.split(rel)
        stem = os.path.splitext(base)[0].replace(".", "_").lstrip("_") or "img"
        key = f"{d}/{stem}" if d else stem
        if len(key) > 90 or key in seen:
            key = f"{key[:60]}_{i:08d}"
        seen.add(key)
        keys.append(key)
    return keys


def _check_prefix(prefix: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.+=-]+", prefix) or prefix.startswith("."):
        raise DatasetError(f"--prefix: {prefix!r}: use letters, digits and _ . + = - only")
    return prefix


def convert_wds(src: str, out_dir: str, *, shard_size: str = "1GB", per_shard: Optional[int] = None,
                seed: int = 0, prefix: str = "", workers: int = 0, max_bad_fraction: float = 0.01,
                progress: bool = True, exclude: str = "", root: str = "",
                classes_file: str = "") -> dict:
    """ImageFolder, list file or Parquet / Arrow files `src` -> tar shards
    OUT_DIR/<prefix>-NNNNNN.tar in the WebDataset layout + OUT_DIR/<prefix>.shards.json;
    returns the index dict. (Parquet: see the module docstring for the order; a row's key is
    `<file stem>_<row>`, its member extension the format its bytes are in.)

    1. index the split (classes as the folder backends number them) and decode every file
       in full on all cores (fastcls.tools.check): undecodable ones are skipped, counted and
       listed in the index; more than `max_bad_fraction` of them fails the conversion;
    2. shuffle the samples once with `seed` (an ImageFolder is sorted by class, and a reader
       streams shards in order: unshuffled, a shard would hold one class), cut them into
       shards of at most `shard_size` bytes (or `per_shard` samples), and write each shard
       as `<key>.cls` + `<key>.<ext>` with the original bytes (webdataset's TarWriter) under
       a temporary name;
    3. record each sample's header offset (read back with tarfile: a reader seeks to a
       mid-shard position with it), then rename the shards and write the index last, so a
       folder with an index always holds complete shards. Old `<prefix>-NNNNNN.tar` shards
       that the new set does not have are removed.
    The prefix defaults to SRC's name (a list file's stem without `_list`: train_list.txt ->
    train)."""
    import tarfile

    from tqdm import tqdm
    from webdataset import TarWriter

    from ..data.shards import FORMAT as WDS_FORMAT
    from ..data.shards import INDEX_SUFFIX, split_name
    from .check import check_paths

    if per_shard is not None and per_shard <= 0:
        raise DatasetError(f"--per-shard: must be > 0, got {per_shard}")
    limit = None if per_shard else parse_size(shard_size)
    rows, index = _rows_or_index(src, exclude, root, classes_file, "wds")
    out = Path(out_dir)

    def make_out() -> None:
        if out.exists() and not out.is_dir():
            raise DatasetError(f"OUT_DIR: {out_dir!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)

    if rows:
        from ..data import open_split
        source = open_split(src)
        prefix = _check_prefix(prefix or _rows_prefix(src, source))
        make_out()
        sids, skipped = _rows(src, source, workers, progress, max_bad_fraction, "the index")
        # one shuffle that reads each row group once: the row groups in a seeded order, the
        # rows of each in a seeded order
        rng = np.random.default_rng(seed)
        group = np.searchsorted(source.group_start, sids, side="right") - 1
        rank = np.empty(len(source.group_start) - 1, np.int64)
        rank[rng.permutation(len(rank))] = np.arange(len(rank))
        sids = [sids[i] for i in np.lexsort((rng.random(len(sids)), rank[group]))]
        labels = [int(source.labels[sid]) for sid in sids]
        keys = []
        for sid in sids:
            f, row = source.position(sid)
            keys.append(f"{Path(source.files[f]).stem.replace('.', '_')}_{row:07d}")
        classes, empty_classes = source.classes, source.empty_classes

        def payload(i: int) -> tuple[bytes, str]:
            data = source.read(sids[i]).data
            return data, _EXT[image_format(data[:16])]

        sizes = [len(payload(i)[0]) for i in range(len(sids))] if limit else [0] * len(sids)
    else:
        prefix = _check_prefix(prefix or (Path(src).stem.removesuffix("_list") if os.path.isfile(src)
                                          else Path(src).resolve().name))
        make_out()
        paths = [p for p, _ in index.samples]
        bad = check_paths(paths, workers, progress=progress)
        good, skipped = _keep_decodable(index.samples, [f"{p}: {why}" for p, why in bad],
                                        {p for p, _ in bad}, src, max_bad_fraction, "the index")
        good = [good[i] for i in np.random.default_rng(seed).permutation(len(good))]
        keys = _sample_keys(index, good)
        labels = [label for _, label in good]
        sizes = [os.stat(p).st_size for p, _ in good]
        classes, empty_classes = index.classes, index.empty_classes

        def payload(i: int) -> tuple[bytes, str]:
            path = good[i][0]
            ext = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
            with open(path, "rb") as img:
                return img.read(), "jpg" if ext == "jpeg" else ext

    # cut into shards: at most `limit` tar bytes (header + padded data per member) or per_shard
    groups, cur, cur_bytes = [], [], 0
    for i, nbytes in enumerate(sizes):
        size = 512 + -(-nbytes // 512) * 512 + 1024  # image member + the .cls member
        if cur and ((per_shard and len(cur) >= per_shard) or (limit and cur_bytes + size > limit)):
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += size
    groups.append(cur)
    width = max(6, len(str(len(groups) - 1)))
    names = [f"{prefix}-{k:0{width}d}.tar" for k in range(len(groups))]
    tmps = [out / f"{n}.tmp-{os.getpid()}" for n in names]
    shards = []
    bar = tqdm(total=len(keys), desc="writing", unit="img", disable=not progress, file=sys.stderr)
    try:
        for name, tmp, group in zip(names, tmps, groups):
            with open(tmp, "wb") as f:
                # webdataset's TarWriter lays the tar out (key.cls + key.<ext>, bytes as they
                # are, mtime 0: reproducible). Which rank and worker read which sample, in what
                # order, is fastcls's plan (shards.ShardPlan), not webdataset's pipeline.
                writer = TarWriter(f, encoder=False, mtime=0)
                for i in group:
                    data, ext = payload(i)
                    writer.write({"__key__": keys[i], "cls": str(labels[i]).encode(), ext: data})
                    bar.update(1)
                writer.close()
            offsets, cur_key = [], None
            with tarfile.open(tmp, "r:") as tar:  # read back: each sample's header offset
                for ti in tar:
                    k, _ = split_name(ti.name)
                    if k != cur_key:
                        offsets.append(ti.offset)
                        cur_key = k
            if len(offsets) != len(group):
                raise DatasetError(f"writing {name}: {len(offsets)} samples read back, "
                                   f"{len(group)} written")
            shards.append({"name": name, "count": len(group), "bytes": tmp.stat().st_size,
                           "offsets": offsets})
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    meta = {"format": WDS_FORMAT, "classes": classes, "empty_classes": empty_classes,
            "num_samples": len(keys), "source": str(Path(src).resolve()), "seed": seed,
            "shard_size": None if per_shard else limit, "per_shard": per_shard,
            "skipped": skipped, "shards": shards}
    final = out / f"{prefix}{INDEX_SUFFIX}"
    final.unlink(missing_ok=True)  # no index while the shard set changes
    for tmp, name in zip(tmps, names):
        os.replace(tmp, out / name)
    stale = re.compile(re.escape(prefix) + r"-\d+\.tar")
    for p in out.iterdir():
        if stale.fullmatch(p.name) and p.name not in names:
            p.unlink()
    mtmp = out / f"{final.name}.tmp-{os.getpid()}"
    mtmp.write_text(json.dumps(meta))
    os.replace(mtmp, final)
    return meta


def ensure_beton(src: str, out: str, *, write_mode: str = "jpg", workers: int = 0) -> str:
    """`out` if it exists, else convert `src` into it in a separate process (so that FFCV's
    forking writer never runs in a process that holds a Loader). Returns `out`."""
    if Path(out).is_file() and meta_path(out).is_file():
        return out
    cmd = [sys.executable, "-m", "fastcls.tools.convert", "--to", "ffcv", src, out,
           "--write-mode", write_mode, "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DatasetError(f"converting {src} to {out} failed: {proc.stderr.strip()[-2000:]}")
    return out


def _cleanup_stale(out: Path, pattern: Optional[str] = None) -> None:
    """Remove temporaries of conversions that were killed (their pid is gone)."""
    for p in out.parent.glob(pattern or f"{out.name}.tmp-*"):
        pid = p.name.split(".tmp-")[1].split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            p.unlink(missing_ok=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcls.tools.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=("ffcv", "wds"),
                   help="ffcv: one .beton file; wds: tar shards (WebDataset layout) + index")
    p.add_argument("src", metavar="SRC_SPLIT",
                   help="ImageFolder split (SRC/<class>/<image>), a list file ('path label' lines) "
                        "or Parquet / Arrow files (file, folder, glob, save_to_disk folder)")
    p.add_argument("out", help="ffcv: the output file OUT.beton; wds: the output folder OUT_DIR")
    p.add_argument("--root", default="", metavar="DIR",
                   help="list files: the folder their paths start from (default: the list's folder)")
    p.add_argument("--classes", default="", metavar="FILE",
                   help="list files: class names, line i = class i ('name' or 'i name')")
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES,
                   help="ffcv: jpg: re-encode as JPEG (small, decode cost); raw: uint8 pixels "
                        "(large, fastest); proportion: each image jpg with --compress-probability")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="ffcv: downscale so the longer side is at most this (default: keep)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="ffcv")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="ffcv --write-mode proportion: fraction of images stored as JPEG")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="1GB",
                      help="wds: at most this many bytes per shard (1GB, 500MB, 2GiB; default 1GB)")
    size.add_argument("--per-shard", type=int, default=None, metavar="N",
                      help="wds: N images per shard instead")
    p.add_argument("--seed", type=int, default=0, help="wds: seed of the one-time sample shuffle")
    p.add_argument("--prefix", default="",
                   help="wds: shard name prefix (default: SRC's name; train_list.txt -> train)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of the files do not decode")
    p.add_argument("--exclude", default="", metavar="FILE",
                   help="skip the images listed in FILE (as data.exclude; written by "
                        "python -m fastcls.tools.check --exclude-out)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    common = dict(workers=args.workers, max_bad_fraction=args.max_bad_fraction,
                  progress=not args.no_progress, exclude=args.exclude, root=args.root,
                  classes_file=args.classes)
    try:
        if args.to == "wds":
            if out.is_dir():
                _cleanup_stale(out / "x", "*.tmp-*")
            meta = convert_wds(args.src, args.out, shard_size=args.shard_size,
                               per_shard=args.per_shard, seed=args.seed, prefix=args.prefix,
                               **common)
        else:
            _cleanup_stale(out)
            meta = convert_ffcv(args.src, args.out, write_mode=args.write_mode,
                                max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                                compress_probability=args.compress_probability, **common)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if args.to == "wds":
        mib = sum(s["bytes"] for s in meta["shards"]) / 2**20
        first, last = meta["shards"][0]["name"], meta["shards"][-1]["name"]
        print(f"wrote {len(meta['shards'])} shards {out}/{first} .. {last} ({meta['num_samples']} "
              f"images, {len(meta['classes'])} classes, {mib:.1f} MiB) + the index in {dt:.1f} s; "
              f"skipped {len(meta['skipped'])} undecodable files")
        return 0
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({meta['num_samples']} images, {len(meta['classes'])} classes, "
          f"{size:.1f} MiB, {args.write_mode}) + {meta_path(out).name} in "
          f"{dt:.1f} s; skipped {len(meta['skipped'])} undecodable files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
