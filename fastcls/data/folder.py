"""Folders and PaddleClas list files: one Source over a table of (path, label).

An ImageFolder is `root/<class>/<image>`, classes sorted by name. A list file holds one
"relative/path label" per line:

    n01440764/n01440764_10026.JPEG 0

its paths relative to `data.root` or, when that is empty, to the list file's folder
(absolute paths are taken as they are); the label is the class index. The optional class
file (`data.classes_file`) names the classes: line i is `name` or `i name` (PaddleClas's
`class_id_map_file`). Without it the classes are "0".."K-1", K = the largest label + 1
(validation: training's). Blank lines and `#` comments are skipped; a bad line (no label, a
label that is no integer or outside the classes, a missing file) is one DatasetError naming
the file and the line. Existence is checked with one directory listing per folder, not one
stat per image (1.28 M images in 1,000 folders: 1,000 metadata operations). A path listed
twice is sampled twice in training (PaddleClas oversamples so); in validation it is an error.

The table holds no Python object per sample (paths in one byte buffer + offsets, labels in
an int64 array): DataLoader workers forked from the main process share its pages, where a
list of (path, label) tuples is copied page by page into every worker as reference counts
touch it (pytorch/pytorch#13246; ~600 MB per worker at ImageNet's 1.28 M images).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .sample import Raw, read_screened
from .source import DatasetError, Source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Files that are datasets of another kind, never list files.
_NOT_LISTS = (".tar", ".json", ".beton", ".gz", ".zip", ".parquet", ".arrow")


class Table:
    """Sample i: the file `root/rel_i` and its label, as numpy buffers (see the module
    docstring)."""

    def __init__(self, root: str, rels: Sequence[str], labels: Sequence[int]):
        enc = [r.encode("utf-8", "surrogateescape") for r in rels]
        self.root = root
        self.offsets = np.zeros(len(enc) + 1, np.int64)
        np.cumsum([len(e) for e in enc], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(enc), np.uint8)
        self.labels = np.asarray(labels, np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        rel = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        return os.path.join(self.root, rel)

    def pairs(self) -> Iterator[tuple[str, int]]:
        """(path, label) of every sample, in order (tools and tests; not on the hot path)."""
        return ((self.path(i), int(self.labels[i])) for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.offsets.nbytes + self.labels.nbytes


@dataclass(frozen=True)
class FolderIndex:
    root: str
    classes: list[str]
    table: Table
    empty_classes: list[str]
    excluded: int = 0                # files dropped by data.exclude

    @property
    def samples(self) -> list[tuple[str, int]]:
        """[(path, label)]: a Python list, for tools and tests only."""
        return list(self.table.pairs())


def is_list_file(path: str) -> bool:
    """A regular file that is not a shard, index, .beton, ... : read as a list file."""
    return bool(path) and ":" not in path.split("/")[0] and os.path.isfile(path) and \
        not path.lower().endswith(_NOT_LISTS + IMAGE_EXTENSIONS)


def read_exclude(path: str) -> frozenset[str]:
    """The `data.exclude` file: one image path per line (absolute, or relative to the split
    root), blank lines and `#` comments ignored. `python -m fastcls.tools.check
    --exclude-out` writes one."""
    if not path:
        return frozenset()
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise DatasetError(f"data.exclude: cannot read {path!r}: {e.strerror}") from None
    return frozenset(os.path.normpath(ln) for ln in lines if ln and not ln.startswith("#"))


def scan_folder(root: str, key: str = "data.train", classes: Optional[Sequence[str]] = None,
                exclude: frozenset[str] = frozenset()) -> FolderIndex:
    """Index `root`. When `classes` is given (validation), the folder's classes must be
    exactly those of training, so label indices mean the same thing in both splits.
    `exclude` (see read_exclude) drops files by absolute path or path relative to `root`."""
    if not root:
        raise DatasetError(f"{key}: no folder given; set {key}=/path/to/{key.split('.')[-1]}")
    p = Path(root)
    if not p.exists():
        raise DatasetError(f"{key}: path {root!r} does not exist")
    if not p.is_dir():
        raise DatasetError(f"{key}: {root!r} is not a directory (expected {key.split('.')[-1]}/<class>/*.jpg)")
    found = sorted(e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DatasetError(f"{key}: {root!r} has no class sub-folders (expected <class>/*.jpg)")
    if classes is not None and list(classes) != found:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DatasetError(f"{key}: classes of {root!r} differ from training's: "
                           f"missing {missing[:10]}, extra {extra[:10]}")
    rels, labels, empty, excluded = [], [], [], 0
    for idx, name in enumerate(found):
        files = sorted(e.name for e in os.scandir(p / name) if e.is_file() and not e.name.startswith(".")
                       and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if exclude:
            kept = [f for f in files if os.path.abspath(os.path.join(root, name, f)) not in exclude
                    and os.path.join(name, f) not in exclude]
            excluded += len(files) - len(kept)
            files = kept
        if not files:
            empty.append(name)
        rels += [os.path.join(name, f) for f in files]
        labels += [idx] * len(files)
    if not rels:
        raise DatasetError(f"{key}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}"
                           + (f" after data.exclude dropped {excluded}" if excluded else ""))
    return FolderIndex(str(p), found, Table(str(p), rels, labels), empty, excluded)


def read_classes(path: str, key: str = "data.classes_file") -> list[str]:
    """Class names from `path`: line i is `name` or `i name`."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{key}: cannot read {path!r}: {getattr(e, 'strerror', e)}") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DatasetError(f"{key}: {path!r} names no classes")
    split = [ln.split(None, 1) for ln in lines]
    if all(len(s) == 2 and s[0].isdigit() for s in split):
        ids = [int(s[0]) for s in split]
        if ids != list(range(len(ids))):
            bad = next(i for i, v in enumerate(ids) if v != i)
            raise DatasetError(f"{key}: {path!r} line {bad + 1}: class id {ids[bad]}, expected "
                               f"{bad} (ids must run 0, 1, 2, ... in order)")
        names = [s[1].strip() for s in split]
    else:
        names = lines
    seen: set[str] = set()  # a set, not a scan of the names before: ImageNet-21k has 21,841
    for name in names:
        if name in seen:
            raise DatasetError(f"{key}: {path!r} names class {name!r} twice")
        seen.add(name)
    return names


def read_list(path: str, key: str = "data.train", *, root: str = "", classes_file: str = "",
              classes: Optional[Sequence[str]] = None, exclude: frozenset[str] = frozenset(),
              num_classes: Optional[int] = None, allow_repeats: bool = True) -> FolderIndex:
    """Index the list file `path` (see the module docstring).

    `classes`: training's classes (validation): labels must lie inside them, and a class file
    must name exactly them. `num_classes` (model.num_classes): the label range when there is
    neither a class file nor `classes`. `exclude` drops files by absolute path or path
    relative to the root. `allow_repeats=False` (validation): a path listed twice is an
    error. Samples keep the list's order."""
    base = Path(root) if root else Path(path).resolve().parent
    if root and not base.is_dir():
        raise DatasetError(f"data.root: {root!r} is not a directory")
    names = read_classes(classes_file) if classes_file else None
    if names is not None and classes is not None and list(classes) != names:
        raise DatasetError(f"{key}: data.classes_file {classes_file!r} names other classes than "
                           f"training's")
    if names is not None:
        limit, what = len(names), f"the {len(names)} classes of {classes_file}"
    elif classes is not None:
        limit, what = len(classes), f"training's {len(classes)} classes"
    elif num_classes is not None:
        limit, what = num_classes, f"model.num_classes={num_classes}"
    else:
        limit, what = None, ""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise DatasetError(f"{key}: {path!r} is not a text list file ('relative/path label' per "
                           f"line), nor an ImageFolder, shard set or index") from None
    except OSError as e:
        raise DatasetError(f"{key}: cannot read {path!r}: {e.strerror}") from None

    rels, labels, lines, errors = [], [], [], []  # per entry; (line, why)
    listed: dict[str, set] = {}  # one listing per folder instead of one stat per file
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # the path may contain spaces; the label is last
        if len(parts) != 2:
            errors.append((no, f"expected 'relative/path label', got {line[:80]!r}"))
            continue
        rel, lab = parts
        try:
            label = int(lab)
        except ValueError:
            errors.append((no, f"label {lab!r} is not an integer"))
            continue
        if label < 0 or (limit is not None and label >= limit):
            errors.append((no, f"label {label} is outside 0..{limit - 1} ({what})"
                           if limit is not None else f"label {label} is negative"))
            continue
        full = os.path.join(base, os.path.normpath(rel))
        d = os.path.dirname(full)
        if d not in listed:
            try:
                listed[d] = {e.name for e in os.scandir(d) if e.is_file()}
            except OSError:
                listed[d] = set()
        if os.path.basename(full) not in listed[d]:
            errors.append((no, f"file {rel!r} does not exist (looked for {full})"))
            continue
        rels.append(os.path.normpath(rel))
        labels.append(label)
        lines.append(no)
    if errors:
        errors.sort()
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise DatasetError(f"{key}: {path}: line {errors[0][0]}: {errors[0][1]}{more}")
    if not allow_repeats:
        first: dict[str, int] = {}
        for no, rel in zip(lines, rels):
            full = os.path.join(base, rel)
            if full in first:
                raise DatasetError(f"{key}: {path}: line {no}: repeats line {first[full]} "
                                   f"({full}); a validation image must be scored once")
            first[full] = no
    excluded = 0
    if exclude:  # absolute, as scan_folder compares them (under a relative root too)
        keep = [i for i, r in enumerate(rels)
                if os.path.abspath(os.path.join(base, r)) not in exclude and r not in exclude]
        excluded = len(rels) - len(keep)
        rels, labels = [rels[i] for i in keep], [labels[i] for i in keep]
    if not rels:
        raise DatasetError(f"{key}: {path!r} lists no images"
                           + (f" after data.exclude dropped {excluded}" if excluded else ""))
    if names is None:
        names = list(classes) if classes is not None else [str(i) for i in range(max(labels) + 1)]
    counts = Counter(labels)
    empty = [n for i, n in enumerate(names) if not counts[i]] if classes is None else []
    return FolderIndex(str(base), names, Table(str(base), rels, labels), empty, excluded)


def index_split(path: str, key: str = "data.train", *, classes: Optional[Sequence[str]] = None,
                exclude: frozenset[str] = frozenset(), root: str = "", classes_file: str = "",
                num_classes: Optional[int] = None, allow_repeats: bool = True) -> FolderIndex:
    """A split given as an ImageFolder root or a list file -> its FolderIndex."""
    if is_list_file(path):
        return read_list(path, key, root=root, classes_file=classes_file, classes=classes,
                         exclude=exclude, num_classes=num_classes, allow_repeats=allow_repeats)
    if path and os.path.isfile(path):
        raise DatasetError(f"{key}: {path!r} is not a directory (expected "
                           f"{key.split('.')[-1]}/<class>/*.jpg) nor a list file ('relative/path "
                           f"label' per line); this backend does not read {Path(path).suffix} files")
    return scan_folder(path, key=key, classes=classes, exclude=exclude)


class FolderSource(Source):
    """An ImageFolder or a list file (the fallback Source: any path no other claims)."""

    def __init__(self, index: FolderIndex, spec):
        super().__init__(spec)
        self.index, self.table = index, index.table
        self.classes, self.empty_classes, self.excluded = index.classes, index.empty_classes, index.excluded
        self.num_samples = len(index.table)

    @staticmethod
    def claims(path: str) -> bool:
        return True

    @classmethod
    def open(cls, spec) -> "FolderSource":
        d = spec.data
        return cls(index_split(spec.path, spec.key, classes=None if spec.train else spec.classes,
                               exclude=read_exclude(d.exclude), root=d.root,
                               classes_file=d.classes_file, num_classes=spec.num_classes,
                               allow_repeats=spec.train), spec)

    def read(self, sid: int) -> Raw:
        return read_screened(self.table.path(sid), int(self.table.labels[sid]), sid)

    def name(self, sid: int) -> str:
        return self.table.path(sid)
