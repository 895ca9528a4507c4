"""ImageFolder scanning: root/<class>/<image>, classes sorted by name."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset problem the user must fix (missing path, no images, class mismatch)."""


@dataclass(frozen=True)
class FolderIndex:
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]   # (path, class index), sorted
    empty_classes: list[str]
    excluded: int = 0                # files dropped by data.exclude


def read_exclude(path: str) -> frozenset[str]:
    """The `data.exclude` file: one image path per line (absolute, or relative to the split
    root), blank lines and `#` comments ignored. `python -m fastcls.data.check --exclude-out`
    writes one."""
    if not path:
        return frozenset()
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise DatasetError(f"data.exclude: cannot read {path!r}: {e.strerror}") from None
    return frozenset(os.path.normpath(ln) for ln in lines if ln and not ln.startswith("#"))


def scan_folder(root: str, key: str = "data.train",
                classes: Optional[Sequence[str]] = None,
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
    samples, empty, excluded = [], [], 0
    for idx, name in enumerate(found):
        files = sorted(
            e.path for e in os.scandir(p / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith("."))
        if exclude:
            kept = [f for f in files if os.path.abspath(f) not in exclude
                    and os.path.join(name, os.path.basename(f)) not in exclude]
            excluded += len(files) - len(kept)
            files = kept
        if not files:
            empty.append(name)
        samples.extend((f, idx) for f in files)
    if not samples:
        raise DatasetError(f"{key}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}"
                           + (f" after data.exclude dropped {excluded}" if excluded else ""))
    return FolderIndex(str(p), found, samples, empty, excluded)
