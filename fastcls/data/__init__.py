"""Data backends behind one interface (`fastcls.data.base.Loader`, docs/data.md).

    loader = build_loader(cfg, "train", device, rank=r, world_size=w)
    for images, labels in loader: ...

images: float N×3×H×W channels_last on `device`, ImageNet-normalized, dtype `dtype`;
labels: int64 on `device`. `len(loader)` = steps per epoch for this rank;
`loader.set_epoch(e, start_step)` reshuffles and seeks; ranks read disjoint samples; training
drops the partial last batch, evaluation keeps it and never duplicates an image.
`loader.classes` is the class list, `loader.bad_files` the undecodable samples met this
epoch on this rank, `loader.excluded` the files data.exclude dropped.

A loader is a decode path applied to a Source (docs/design.md): `SOURCES` lists the dataset
formats (the first whose `claims(path)` holds reads the split), `BUILDERS` maps
data.backend to the path that decodes it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import weakref
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..config import BACKENDS, Config, resolve
from .base import Loader, LoaderSpec
from .folder import FolderSource, index_split, read_exclude, scan_folder
from .parquet import ParquetSource
from .shards import ShardSource, is_shards
from .source import DatasetError, Source

# The dataset formats, in the order they are asked whether they read a path (a new format:
# one file with a Source subclass, one line here; FolderSource takes whatever is left).
SOURCES: list[type[Source]] = [ParquetSource, ShardSource, FolderSource]

SPLITS = ("train", "val")

# Backends that need an optional package: (module, the install command shown when missing).
_OPTIONAL = {
    "dali": ("nvidia.dali", "pip install 'fastcls[dali]'  (= nvidia-dali-cuda120; CUDA 13: "
                            "pip install nvidia-dali-cuda130)"),
    "ffcv": ("ffcv", "apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
                     "pip install 'fastcls[ffcv]'"),
}


def dataset_paths(cfg: Config) -> tuple[str, str]:
    """(train, val) folders or files; `data.demo: true` generates/locates the demo dataset."""
    if cfg.data.demo:
        from ..tools.demo import ensure_demo_dataset
        return ensure_demo_dataset()
    return cfg.data.train, cfg.data.val


def open_source(spec: LoaderSpec) -> Source:
    """The Source of `spec.path` for `spec`'s rank (the first of SOURCES that claims it)."""
    return next(s for s in SOURCES if s.claims(spec.path)).open(spec)


def open_split(path: str, split: str = "train") -> Source:
    """The Source that data.<split>=`path` reads, with default settings (the tools' way in)."""
    from ..config import config_from_dict
    return open_source(_spec(config_from_dict({"data": {split: path, "batch_size": 1}}), split, path,
                             torch.device("cpu"), batch_size=1))


def split_size(cfg: Config, split: str = "train") -> int:
    """Images in the split named by the config (folder, list file, shards, Parquet or .beton),
    without building a loader: what --print-config and resolve() count."""
    path = dataset_paths(cfg)[SPLITS.index(split)]
    if cfg.data.backend == "ffcv":  # the converter's sidecar holds the count (no ffcv import)
        from .beton import read_meta
        return int(read_meta(path, f"data.{split}")["num_samples"])
    return open_source(_spec(cfg, split, path, torch.device("cpu"), batch_size=1)).num_samples


def check_backend(name: str) -> None:
    if name in _OPTIONAL:
        module, install = _OPTIONAL[name]
        if importlib.util.find_spec(module.split(".")[0]) is None or \
                importlib.util.find_spec(module) is None:
            raise DatasetError(f"data.backend={name}: {module} is not installed; run: {install}")


def _native(spec: LoaderSpec) -> Loader:
    d = spec.data
    if d.native_decode == "batched" or (d.native_decode == "auto" and spec.device.type == "cuda"):
        from .batched import BatchedLoader
        return BatchedLoader(open_source(spec), spec)
    from .workers import WorkersLoader
    return WorkersLoader(open_source(spec), spec)


def _dali(spec: LoaderSpec) -> Loader:
    from .dali import DaliLoader
    return DaliLoader(open_source(spec), spec)


def _ffcv(spec: LoaderSpec) -> Loader:
    from .ffcv_loader import build_ffcv_loader
    return build_ffcv_loader(spec)


def _synthetic(spec: LoaderSpec) -> Loader:
    from .synthetic import SyntheticLoader
    return SyntheticLoader(spec)


# data.backend -> builder (the implementations import lazily: dali and ffcv are optional).
BUILDERS: dict[str, Callable[[LoaderSpec], Loader]] = {
    "native": _native, "synthetic": _synthetic, "dali": _dali, "ffcv": _ffcv}
assert tuple(BUILDERS) == BACKENDS


def build_loader(cfg: Config, split: str, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, dtype: torch.dtype = torch.float32,
                 classes: Optional[Sequence[str]] = None, path: Optional[str] = None) -> Loader:
    """Build the loader of `split` ("train"|"val") for this rank.

    `classes`: the training class list, required to match for "val". `path` overrides the
    split's folder/file (default: from the config / demo dataset)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_backend(cfg.data.backend)
    if path is None:
        path = "" if cfg.data.backend == "synthetic" else dataset_paths(cfg)[SPLITS.index(split)]
    spec = _spec(cfg, split, path, device, resolve(cfg, world_size).batch_size, rank=rank,
                 world_size=world_size, dtype=dtype, classes=classes)
    loader = BUILDERS[cfg.data.backend](spec)
    for scope in _SCOPES:
        scope.add(loader)
    return loader


def _spec(cfg: Config, split: str, path: str, device: torch.device, batch_size: int, *,
          rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
          classes: Optional[Sequence[str]] = None) -> LoaderSpec:
    return LoaderSpec(split=split, path=path, data=cfg.data, batch_size=batch_size, device=device,
                      dtype=dtype, rank=rank, world_size=world_size, seed=cfg.train.seed,
                      num_classes=cfg.model.num_classes, classes=classes)


_SCOPES: list = []  # the open closing_loaders() blocks: weak sets of the loaders built inside


@contextlib.contextmanager
def closing_loaders() -> Iterator[None]:
    """Every loader built inside the block has its workers stopped when the block exits,
    however it exits (`fastcls.train` and `fastcls.eval` run inside one). Explicit, not left
    to reference counting: see base.shutdown_workers for the +70 s exit it avoids."""
    built: "weakref.WeakSet[Loader]" = weakref.WeakSet()  # keeps no loader alive
    _SCOPES.append(built)
    try:
        yield
    finally:
        _SCOPES.remove(built)
        for loader in list(built):
            loader.close()


__all__ = ["BUILDERS", "SOURCES", "Loader", "LoaderSpec", "Source", "build_loader", "closing_loaders",
           "dataset_paths", "DatasetError", "index_split", "is_shards", "open_source", "open_split", "read_exclude",
           "scan_folder", "split_size"]
