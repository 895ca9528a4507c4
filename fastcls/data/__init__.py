"""Data backends behind one interface (`fastcls.data.base.Loader`, docs/data.md).

    loader = build_loader(cfg, "train", device, rank=r, world_size=w)
    for images, labels in loader: ...

images: float N×3×H×W channels_last on `device`, ImageNet-normalized, dtype `dtype`;
labels: int64 on `device`. `len(loader)` = steps per epoch for this rank;
`loader.set_epoch(e, start_step)` reshuffles and seeks; shards are disjoint; training drops
the partial last batch, evaluation keeps it and never duplicates an image.
`loader.classes` is the class list, `loader.bad_files` the undecodable files met this
epoch on this rank, `loader.excluded` the files data.exclude dropped.

A backend is one entry of `BUILDERS`: a function of the split's `LoaderSpec`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import weakref
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..config import BACKENDS, Config, resolve
from .base import Loader, LoaderSpec
from .folder import DatasetError, read_exclude, scan_folder
from .listfile import index_split, is_shards

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
        from .demo import ensure_demo_dataset
        return ensure_demo_dataset()
    return cfg.data.train, cfg.data.val


def split_size(cfg: Config, split: str = "train") -> int:
    """Images in the split named by the config (folder, list file, shards or .beton),
    without building a loader: what --print-config and resolve() count."""
    path = dataset_paths(cfg)[SPLITS.index(split)]
    key = f"data.{split}"
    if cfg.data.backend == "ffcv":  # the converter's sidecar holds the count (no ffcv import)
        from .beton import read_meta
        return int(read_meta(path, key)["num_samples"])
    if is_shards(path):
        from .wds import open_shards
        return open_shards(path, key).num_samples
    return len(index_split(path, key, exclude=read_exclude(cfg.data.exclude), root=cfg.data.root,
                           classes_file=cfg.data.classes_file,
                           num_classes=cfg.model.num_classes).samples)


def check_backend(name: str) -> None:
    if name in _OPTIONAL:
        module, install = _OPTIONAL[name]
        if importlib.util.find_spec(module.split(".")[0]) is None or \
                importlib.util.find_spec(module) is None:
            raise DatasetError(f"data.backend={name}: {module} is not installed; run: {install}")


def _folder(spec: LoaderSpec):
    """The split's index, from an ImageFolder root or a list file (val: the classes must be
    training's)."""
    d = spec.data
    return index_split(spec.path, spec.key, classes=None if spec.train else spec.classes,
                       exclude=read_exclude(d.exclude), root=d.root, classes_file=d.classes_file,
                       num_classes=spec.num_classes, allow_repeats=spec.train)


def _native(spec: LoaderSpec) -> Loader:
    d = spec.data
    batched = d.native_decode == "batched" or (d.native_decode == "auto" and spec.device.type == "cuda")
    if is_shards(spec.path):  # tar shards, streamed by the workers (fastcls/data/wds.py)
        if batched:
            from .wds_backends import build_batched_shard_loader
            return build_batched_shard_loader(spec)
        from .wds import build_shard_loader
        return build_shard_loader(spec)
    if batched:
        from .native_batched import BatchedNativeLoader
        return BatchedNativeLoader(_folder(spec), spec)
    from .native import NativeLoader
    return NativeLoader(_folder(spec), spec)


def _dali(spec: LoaderSpec) -> Loader:
    if is_shards(spec.path):  # local shards, read by position (fastcls/data/wds_backends.py)
        from .wds_backends import build_dali_shard_loader
        return build_dali_shard_loader(spec)
    from .dali import DaliLoader
    return DaliLoader(_folder(spec), spec)


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
    spec = LoaderSpec(split=split, path=path, data=cfg.data,
                      batch_size=resolve(cfg, world_size).batch_size, device=device, dtype=dtype,
                      rank=rank, world_size=world_size, seed=cfg.train.seed,
                      num_classes=cfg.model.num_classes, classes=classes)
    loader = BUILDERS[cfg.data.backend](spec)
    for scope in _SCOPES:
        scope.add(loader)
    return loader


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


__all__ = ["BUILDERS", "Loader", "LoaderSpec", "build_loader", "closing_loaders", "dataset_paths",
           "DatasetError", "index_split", "is_shards", "read_exclude", "scan_folder", "split_size"]
