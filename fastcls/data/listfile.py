"""PaddleClas-style list files: `train_list.txt` with one "relative/path label" per line.

    n01440764/n01440764_10026.JPEG 0
    n01443537/n01443537_1000.JPEG 1

Paths are relative to `root` (`data.root`) or, when it is empty, to the list file's folder
(absolute paths are taken as they are); the label is the class index. The optional class
file (`data.classes_file`) names the classes: line i is class i, either `name` or
`i name` (PaddleClas's `class_id_map_file` form, e.g. `0 tench, Tinca tinca`). Without it
the classes are called "0".."K-1", K = the largest label + 1 (validation: training's).

`read_list` produces the same `FolderIndex` as the ImageFolder scan, so every backend that
reads folders (native PIL workers, native batched, DALI) and both converters take a list
file unchanged. Blank lines and `#` comments are skipped. A bad line (no label, a label
that is no integer or outside the classes, a file that does not exist) is one DatasetError
naming the list file and the line. Existence is checked with one directory listing per
folder the list uses, not one stat per image (a list of 1.28 M images in 1,000 folders costs
1,000 metadata operations, like the folder scan). A path listed twice is sampled twice in
training (PaddleClas oversamples so); in validation it is an error (it would be scored twice).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .folder import IMAGE_EXTENSIONS, DatasetError, FolderIndex, scan_folder

# Files that are datasets of another kind, never list files.
_NOT_LISTS = (".tar", ".json", ".beton", ".gz", ".zip")
INDEX_SUFFIX = ".shards.json"  # a shard set's index (fastcls/data/wds.py)


def is_local(url: str) -> bool:
    """A path (or file: URL), not pipe:/http:/s3:... ."""
    return url.startswith("file:") or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)


def is_shards(path: str) -> bool:
    """Does `path` name a shard set (index, .tar, brace pattern, URL, folder of shards)?"""
    if not path:
        return False
    low = path.lower()
    if not is_local(path) or low.endswith((".tar", ".json")) or ("{" in path and ".tar" in low):
        return True
    if os.path.isdir(path):
        entries = list(os.scandir(path))
        if any(e.name.endswith(INDEX_SUFFIX) for e in entries):
            return True
        return any(e.name.endswith(".tar") for e in entries) and not any(
            e.is_dir() and not e.name.startswith(".") for e in entries)
    return False


def is_list_file(path: str) -> bool:
    """A regular file that is not a shard, index or .beton: read as a list file."""
    return bool(path) and is_local(path) and os.path.isfile(path) and \
        not path.lower().endswith(_NOT_LISTS + IMAGE_EXTENSIONS)


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
    neither a class file nor `classes`. `exclude` (see folder.read_exclude) drops files by
    absolute path or path relative to the root. `allow_repeats=False` (validation): a path
    listed twice is an error. Samples keep the list's order."""
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

    entries, errors = [], []  # (line number, absolute path, relative path, label); (line, why)
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
        full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(base, rel))
        entries.append((no, full, rel, label))
    listed: dict[str, set] = {}  # one listing per folder instead of one stat per file
    for no, full, rel, _ in entries:
        d = os.path.dirname(full)
        if d not in listed:
            try:
                listed[d] = {e.name for e in os.scandir(d) if e.is_file()}
            except OSError:
                listed[d] = set()
        if os.path.basename(full) not in listed[d]:
            errors.append((no, f"file {rel!r} does not exist (looked for {full})"))
    if errors:
        errors.sort()
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise DatasetError(f"{key}: {path}: line {errors[0][0]}: {errors[0][1]}{more}")
    if not allow_repeats:
        first: dict[str, int] = {}
        for no, full, _, _ in entries:
            if full in first:
                raise DatasetError(f"{key}: {path}: line {no}: repeats line {first[full]} "
                                   f"({full}); a validation image must be scored once")
            first[full] = no

    excluded = 0
    if exclude:
        # absolute as folder.scan_folder compares them (`full` is relative under a relative root)
        kept = [e for e in entries
                if os.path.abspath(e[1]) not in exclude and os.path.normpath(e[2]) not in exclude]
        excluded, entries = len(entries) - len(kept), kept
    if not entries:
        raise DatasetError(f"{key}: {path!r} lists no images"
                           + (f" after data.exclude dropped {excluded}" if excluded else ""))
    if names is None:
        names = list(classes) if classes is not None else \
            [str(i) for i in range(max(lab for *_, lab in entries) + 1)]
    counts = defaultdict(int)
    for *_, lab in entries:
        counts[lab] += 1
    empty = [n for i, n in enumerate(names) if not counts[i]] if classes is None else []
    return FolderIndex(str(base), names, [(full, lab) for _, full, _, lab in entries], empty,
                       excluded)


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
