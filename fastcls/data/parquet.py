"""Parquet and Arrow image datasets (Hugging Face layout): the Parquet Source, on every path.

`data.train` / `data.val` name, read with pyarrow alone (`datasets` is not needed):

- one `.parquet` file, a folder of them, or a glob / brace pattern
  (`/d/imagenet-1k/data/train-*.parquet`, `/d/x-{00000..00003}.parquet`): what the Hub
  serves and `Dataset.to_parquet` writes;
- a `Dataset.save_to_disk` folder (`state.json` + `data-NNNNN-of-NNNNN.arrow`), or `.arrow`
  files / patterns of a `datasets` cache (Arrow IPC streams, memory-mapped).

A folder holding the files of several splits (a Hub snapshot's `data/`: `train-*`,
`validation-*`, `test-*`) is refused with the pattern to name one.

Columns: the image column is Hugging Face's `Image` feature (a struct of `bytes` and `path`;
a row with no bytes reads `path`, absolute or relative to the data file's folder) or plain
binary; the label column an integer (`ClassLabel`) or a string. They are named by
`data.parquet.image_column` / `data.parquet.label_column`, else found by name (`image`,
`img`, `jpg`, ...; `label`, `labels`, `cls`, ...), else by their Hugging Face feature type.

Classes: the `ClassLabel` names of the file's Hugging Face schema metadata (label i is the
Hub's class i), else the sorted distinct strings, else the integers 0..max. Validation must
agree with training: the same `ClassLabel` names, strings among training's classes, or
integers read as training's indices. A label outside the classes (the Hub's -1 of an
unlabelled split) is a counted bad sample, as a non-image blob is (`sample.screen`).

Reading: random access by row group. The Source holds counts and labels only, as numpy
arrays (the row-group index: first sample id of each row group, its file and number), so
forked DataLoader workers share its pages and a spawned one receives a few arrays; each
process opens the files lazily (memory-mapped); an Arrow file is one memory map, read row by
row without copying.

The order of Parquet files is the shards' plan (`shards.ShardPlan`) over row groups: a Parquet file's row
group is read whole (pyarrow reads no single row), as a tar shard is read in sequence, so
the same plan fits: row groups permuted per epoch, ranks take equal disjoint ranges, one
stream per DataLoader worker, a seeded shuffle buffer (`data.parquet.shuffle_buffer`)
within each stream, exact mid-epoch seek, validation in file order with each image once.
A stream's window of `shuffle_buffer` consecutive samples spans at most
`shuffle_buffer / rows per group + 2` row groups, so each process keeps that many decoded
row groups (`_keep`) and reads each row group once per epoch. Memory per worker is about
that count times a row group's size; a row group whose image column exceeds
`ROW_GROUP_LIMIT` is refused with the rewrite command. Arrow files alone (`save_to_disk`,
a `datasets` cache) read any row from the memory map, so they take the folders' order
(`RankOrder`: a full permutation per epoch).
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections import OrderedDict
from functools import cached_property
from typing import Optional, Sequence

import numpy as np

from .sample import Raw, read_screened, screen
from .shards import ShardPlan
from .source import DatasetError, RankOrder, Source

SUFFIXES = (".parquet", ".arrow")
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
LABEL_NAMES = ("label", "labels", "cls", "class", "target")
ROW_GROUP_LIMIT = 512 << 20   # one row group's image bytes: what a cache miss reads
HANDLES = 16                  # open files per process (the most recently used)
_SPLIT_FILE = re.compile(r"^(.*?)[-_]\d+[-_]of[-_]\d+\.(parquet|arrow)$")
INSTALL = "pip install 'fastcls[parquet]'  (= pyarrow)"


def _pa():
    """pyarrow (the `parquet` extra) or a DatasetError with the install command."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DatasetError(f"Parquet/Arrow datasets need pyarrow: {INSTALL}") from None
    return pyarrow


def _is_pattern(path: str) -> bool:
    return any(c in path for c in "*?[{")


def is_parquet(path: str) -> bool:
    """Does `path` name Parquet/Arrow data (a file, a pattern, a folder of them, a
    `save_to_disk` folder)? Decided from names alone: nothing is opened."""
    if not path or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path):
        return False
    low = path.lower()
    if low.endswith(SUFFIXES):
        return True
    if _is_pattern(path):
        return any(s in low for s in SUFFIXES)
    if os.path.isdir(path):
        names = os.listdir(path)
        return "dataset_dict.json" in names or any(n.lower().endswith(SUFFIXES) for n in names)
    return False


def data_files(path: str, key: str) -> list[str]:
    """The data files `path` names, in order (see the module docstring)."""
    if _is_pattern(path):
        from braceexpand import braceexpand  # webdataset's dependency (install_requires)
        files = []
        for p in braceexpand(path):
            found = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.isfile(p) else [])
            files += [f for f in found if f not in files]
        if not files:
            raise DatasetError(f"{key}: no file matches {path!r}")
        return files
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetError(f"{key}: path {path!r} does not exist")
    names = sorted(os.listdir(path))
    if "dataset_dict.json" in names:
        splits = sorted(n for n in names if os.path.isdir(os.path.join(path, n)))
        raise DatasetError(f"{key}: {path!r} is a DatasetDict saved with save_to_disk; name a split: "
                           + ", ".join(f"{key}={os.path.join(path, s)}" for s in splits))
    if "state.json" in names:  # Dataset.save_to_disk: its Arrow files, in its order
        try:
            with open(os.path.join(path, "state.json")) as f:
                files = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{key}: cannot read {os.path.join(path, 'state.json')}: {e}") from None
        return files
    for suffix in SUFFIXES:
        files = [os.path.join(path, n) for n in names if n.lower().endswith(suffix)]
        if files:
            break
    prefixes = sorted({m.group(1) for m in map(_SPLIT_FILE.match, map(os.path.basename, files)) if m})
    if len(prefixes) > 1:
        raise DatasetError(f"{key}: {path!r} holds the files of several splits ({', '.join(prefixes)}); "
                           f"name one, e.g. {key}={os.path.join(path, prefixes[0])}-*{suffix}")
    return files


def hf_features(schema) -> dict:
    """The Hugging Face `features` stored in an Arrow schema's metadata ({} when none)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        info = json.loads(meta)
    except ValueError:
        return {}
    feats = info.get("info", {}).get("features") if isinstance(info, dict) else None
    return feats if isinstance(feats, dict) else {}


def _feature_type(feature) -> str:
    return feature.get("_type", "") if isinstance(feature, dict) else ""


def pick_columns(schema, features: dict, data, key: str, file: str) -> tuple[str, str]:
    """(image column, label column): the data.parquet knobs, else the usual names, else the
    Hugging Face feature types; a one-line DatasetError listing the columns otherwise."""
    cols = list(schema.names)
    listed = ", ".join(f"{n} ({schema.field(n).type})" for n in cols)
    out = []
    for what, knob, names, ftype in (("image", data.image_column, IMAGE_NAMES, "Image"),
                                     ("label", data.label_column, LABEL_NAMES, "ClassLabel")):
        if knob:
            if knob not in cols:
                raise DatasetError(f"{key}: data.parquet.{what}_column={knob!r} is not a column of "
                                   f"{file} (columns: {listed})")
            out.append(knob)
            continue
        found = [n for n in names if n in cols] or \
            [n for n in cols if _feature_type(features.get(n)) == ftype]
        if not found:
            raise DatasetError(f"{key}: no {what} column found in {file} (columns: {listed}); set "
                               f"data.parquet.{what}_column=NAME")
        out.append(found[0])
    return out[0], out[1]


class _File:
    """One data file's metadata, read once in the opening process."""

    def __init__(self, path: str, key: str):
        pa = _pa()
        self.path = path
        self.arrow = path.lower().endswith(".arrow")
        try:
            if self.arrow:
                self.schema = _open_arrow(path).schema
                self.groups = None  # counted when the labels are read
            else:
                pf = pa.parquet.ParquetFile(path, memory_map=True)
                self.schema, self.meta = pf.schema_arrow, pf.metadata
                self.groups = [self.meta.row_group(i).num_rows for i in range(self.meta.num_row_groups)]
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{key}: cannot read {path!r}: {e}") from None
        self.features = hf_features(self.schema)

    def labels(self, column: str, key: str):
        pa = _pa()
        try:
            if self.arrow:
                col = _open_arrow(path=self.path).column(column)
                self.groups = [len(col)]
            else:
                col = pa.parquet.ParquetFile(self.path, memory_map=True).read(columns=[column]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{key}: cannot read column {column!r} of {self.path!r}: {e}") from None
        return col

    def image_group_bytes(self, column: str) -> int:
        """The largest row group's uncompressed image bytes (Parquet; 0 for Arrow files)."""
        if self.arrow:
            return 0
        top = 0
        for i in range(self.meta.num_row_groups):
            rg = self.meta.row_group(i)
            top = max(top, sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                               if rg.column(j).path_in_schema.split(".")[0] == column))
        return top


def _open_arrow(path: str):
    """An Arrow file (IPC file or stream format: `datasets` writes streams) as a Table over a
    memory map: no copy, pages shared by every process that maps it."""
    pa = _pa()
    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _labels(cols, features: list[dict], label: str, given: Optional[Sequence[str]], key: str,
            paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """The label columns of the files -> (int64 labels, class names); `given`: training's
    classes (validation), which the files must agree with."""
    pa = _pa()
    cols = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in cols]
    typ = cols[0].type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        values = [c.to_pylist() for c in cols]
        if any(v is None for vs in values for v in vs):
            raise DatasetError(f"{key}: label column {label!r} has empty (null) labels")
        names = list(given) if given is not None else sorted({v for vs in values for v in vs})
        index = {c: i for i, c in enumerate(names)}
        missing = sorted({v for vs in values for v in vs} - set(index))
        if missing:
            raise DatasetError(f"{key}: labels {missing[:5]} are not among training's {len(names)} "
                               f"classes (the train and val files must agree)")
        return np.array([index[v] for vs in values for v in vs], np.int64), names
    if not pa.types.is_integer(typ):
        raise DatasetError(f"{key}: {paths[0]}: label column {label!r} is {typ}; expected integers "
                           f"(ClassLabel) or strings; set data.parquet.label_column")
    found = []
    for c, feats, path in zip(cols, features, paths):
        if not pa.types.is_integer(c.type):
            raise DatasetError(f"{key}: {path}: label column {label!r} is {c.type}, {paths[0]}'s is {typ}")
        f = feats.get(label)
        found.append(list(f["names"]) if _feature_type(f) == "ClassLabel" and f.get("names") else None)
    if any(n != found[0] for n in found):
        bad = next(p for p, n in zip(paths, found) if n != found[0])
        raise DatasetError(f"{key}: {bad} names other classes (ClassLabel) than {paths[0]}")
    labels = np.concatenate([c.fill_null(-1).to_numpy().astype(np.int64) for c in cols])
    if given is not None:
        if found[0] is not None and found[0] != list(given):
            raise DatasetError(f"{key}: the ClassLabel names of {paths[0]} differ from training's "
                               f"({len(found[0])} vs {len(given)} classes)")
        return labels, list(given)
    if found[0] is not None:
        return labels, found[0]
    return labels, [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]


class ParquetSource(Source):
    """Parquet/Arrow files as a Source (see the module docstring)."""

    def __init__(self, spec):
        super().__init__(spec)
        pa = _pa()
        key, d = spec.key, spec.data.parquet
        if spec.data.exclude:
            raise DatasetError(f"data.exclude applies to folders and list files; {key} names "
                               f"Parquet/Arrow files (bad rows are counted and skipped as they are met)")
        files = [_File(p, key) for p in data_files(spec.path, key)]
        if not files:
            raise DatasetError(f"{key}: {spec.path!r} holds no .parquet or .arrow files")
        first = files[0]
        features = first.features
        if not features and first.arrow:
            info = os.path.join(os.path.dirname(first.path), "dataset_info.json")
            if os.path.isfile(info):
                try:
                    with open(info) as f:
                        features = json.load(f).get("features") or {}
                except (OSError, ValueError):
                    features = {}
            for f in files:  # save_to_disk's folder-level features: every file's
                f.features = f.features or features
        self.image, self.label = pick_columns(first.schema, features, d, key, first.path)
        for f in files:
            for c in (self.image, self.label):
                if c not in f.schema.names:
                    raise DatasetError(f"{key}: {f.path} has no column {c!r} (columns: "
                                       f"{', '.join(f.schema.names)}); the files of a split must agree")
        typ = first.schema.field(self.image).type
        self.has_path = pa.types.is_struct(typ) and typ.get_field_index("path") >= 0
        if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
            self.struct = True
        elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            self.struct = False
        else:
            raise DatasetError(f"{key}: image column {self.image!r} of {first.path} is {typ}; expected "
                               f"encoded images: the Hugging Face Image feature (struct<bytes, path>) "
                               f"or binary; set data.parquet.image_column")
        for f in files:
            big = f.image_group_bytes(self.image)
            if big > ROW_GROUP_LIMIT:
                raise DatasetError(
                    f"{key}: {f.path} has a row group of {big / 2**20:.0f} MiB of images (a cache miss "
                    f"reads a whole row group in every worker; limit {ROW_GROUP_LIMIT >> 20} MiB): "
                    f"rewrite it with small row groups: pyarrow.parquet.write_table("
                    f"pyarrow.parquet.read_table(IN), OUT, row_group_size=100)")

        # labels and classes (validation: training's)
        given = None if spec.train or spec.classes is None else list(spec.classes)
        labels, names = _labels([f.labels(self.label, key) for f in files], [f.features for f in files],
                                self.label, given, key, [f.path for f in files])
        if not names:
            raise DatasetError(f"{key}: no labels in {spec.path!r} (every label is negative)")
        self.classes = list(names)
        self.labels = labels
        self.labels.setflags(write=False)
        counts = np.bincount(labels[(labels >= 0) & (labels < len(names))], minlength=len(names))
        self.empty_classes = [n for n, c in zip(names, counts) if not c] if spec.train else []

        # the row-group index: numpy only (shared by forked workers, cheap to pickle)
        self.files = [f.path for f in files]
        groups = [g for f in files for g in f.groups]
        self.group_file = np.array([i for i, f in enumerate(files) for _ in f.groups], np.int32)
        self.group_index = np.array([j for f in files for j in range(len(f.groups))], np.int32)
        self.group_rows = np.asarray(groups, np.int64)
        self.group_start = np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)
        self.file_start = np.concatenate([[0], np.cumsum([sum(f.groups) for f in files])]).astype(np.int64)
        self.num_samples = int(self.group_start[-1])
        if self.num_samples != len(labels):
            raise DatasetError(f"{key}: {spec.path!r}: {len(labels)} labels for {self.num_samples} rows")
        if not self.num_samples:
            raise DatasetError(f"{key}: {spec.path!r} holds no rows")
        self._pid = -1

    @cached_property
    def order(self):
        """The shards' plan with row groups for shards (see the module docstring); Arrow
        files alone (memory-mapped rows, true random access) take the folders' order."""
        s = self.spec
        if all(f.lower().endswith(".arrow") for f in self.files):
            return RankOrder(self.num_samples, s.batch_size, s.rank, s.world_size, train=s.train, seed=s.seed)
        return ShardPlan(self.group_rows, s.batch_size, s.rank, s.world_size, train=s.train, seed=s.seed,
                         streams=s.data.workers, shuffle_buffer=s.data.parquet.shuffle_buffer)

    @cached_property
    def _keep(self) -> int:
        """Decoded row groups kept per process: those one stream's shuffle window can span."""
        rows = self.group_rows[self.group_rows > 0]
        return 2 + -(-getattr(self.order, "shuffle_buffer", 0) // int(rows.min() if len(rows) else 1))

    @staticmethod
    def claims(path: str) -> bool:
        return is_parquet(path)

    @classmethod
    def open(cls, spec) -> "ParquetSource":
        return cls(spec)

    def __getstate__(self):  # open files and cached row groups stay in their process
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_cache")} | {"_pid": -1}

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._handles, self._cache = os.getpid(), OrderedDict(), OrderedDict()

    def _handle(self, i: int):
        """File i, opened in this process: a ParquetFile, or an Arrow file's image column
        (a memory map)."""
        h = self._handles.pop(i, None)
        if h is None:
            if len(self._handles) >= HANDLES:
                self._handles.popitem(last=False)
            path = self.files[i]
            h = _open_arrow(path).column(self.image) if path.lower().endswith(".arrow") else \
                _pa().parquet.ParquetFile(path, memory_map=True)
        self._handles[i] = h  # most recent last
        return h

    def _group(self, g: int):
        """Row group g's image column (a pyarrow array): an Arrow file's memory map as it is
        (nothing copied or cached), a Parquet row group from this process's cache."""
        f = int(self.group_file[g])
        if self.files[f].lower().endswith(".arrow"):
            return self._handle(f)
        col = self._cache.pop(g, None)
        if col is None:
            while len(self._cache) >= self._keep:
                self._cache.popitem(last=False)
            col = self._handle(f).read_row_group(int(self.group_index[g]), columns=[self.image]).column(0)
        self._cache[g] = col  # most recent last
        return col

    def position(self, sid: int) -> tuple[int, int]:
        """Sample id -> (file, row in the file)."""
        f = int(np.searchsorted(self.file_start, sid, side="right")) - 1
        return f, sid - int(self.file_start[f])

    def name(self, sid: int) -> str:
        f, row = self.position(sid)
        return f"{os.path.basename(self.files[f])}:#{row}"

    def read(self, sid: int) -> Raw:
        sid = int(sid)
        self._own()
        name, label = self.name(sid), int(self.labels[sid])
        if not 0 <= label < len(self.classes):
            return Raw(b"", -1, sid, name, f"label {label} is not a class index in 0..{len(self.classes) - 1}")
        g = int(np.searchsorted(self.group_start, sid, side="right")) - 1
        value = self._group(g)[sid - int(self.group_start[g])]
        path = None
        if not value.is_valid:
            data = None
        elif self.struct:
            data, path = value["bytes"].as_py(), value["path"].as_py() if self.has_path else None
        else:
            data = value.as_py()
        if data is None:
            if path:  # an Image feature stored by path: the file itself
                full = path if os.path.isabs(path) else \
                    os.path.join(os.path.dirname(self.files[self.position(sid)[0]]), path)
                raw = read_screened(full, label, sid)
                return raw._replace(name=name) if raw.error is None else raw._replace(name=f"{name} ({full})")
            return Raw(b"", label, sid, name, "no image bytes (null)")
        why = screen(data)
        return Raw(b"" if why else data, label, sid, name, why)
