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

import importlib.util
from typing import Callable, Optional, Sequence

import torch

from ..config import BACKENDS, Config, resolve
from .base import Loader, LoaderSpec
from .folder import DatasetError, read_exclude, scan_folder

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


def check_backend(name: str) -> None:
    if name in _OPTIONAL:
        module, install = _OPTIONAL[name]
        if importlib.util.find_spec(module.split(".")[0]) is None or \
                importlib.util.find_spec(module) is None:
            raise DatasetError(f"data.backend={name}: {module} is not installed; run: {install}")


def _folder(spec: LoaderSpec):
    """The split's ImageFolder index (val: the classes must be training's)."""
    return scan_folder(spec.path, key=spec.key, classes=None if spec.train else spec.classes,
                       exclude=read_exclude(spec.data.exclude))


def _sizes_not_wired(spec: LoaderSpec, backend: str) -> None:
    """Until a backend applies train_image_size/val_image_size, refuse the sizes it would
    ignore rather than train at data.image_size silently."""
    d = spec.data
    if d.progressive.start_size or (d.val_image_size and d.val_image_size != d.image_size):
        raise DatasetError(f"data.progressive / data.val_image_size are not supported by {backend} "
                           f"yet; use data.backend=ffcv, data.backend=synthetic or "
                           f"data.native_decode=workers")


def _native(spec: LoaderSpec) -> Loader:
    d = spec.data
    if d.native_decode == "batched" or (d.native_decode == "auto" and spec.device.type == "cuda"):
        from .native_batched import BatchedNativeLoader
        _sizes_not_wired(spec, "the batched native path")
        return BatchedNativeLoader(_folder(spec), spec)
    from .native import NativeLoader
    return NativeLoader(_folder(spec), spec)


def _dali(spec: LoaderSpec) -> Loader:
    from .dali import DaliLoader
    _sizes_not_wired(spec, "data.backend=dali")
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
    return BUILDERS[cfg.data.backend](spec)


__all__ = ["BUILDERS", "Loader", "LoaderSpec", "build_loader", "dataset_paths", "DatasetError",
           "read_exclude", "scan_folder"]
