"""Data backends behind one interface (DESIGN.md, "The one data interface").

    loader = build_loader(cfg, "train", device, rank=r, world_size=w)
    for images, labels in loader: ...

images: float N×3×H×W channels_last on `device`, ImageNet-normalized, dtype `dtype`;
labels: int64 on `device`. `len(loader)` = steps per epoch for this rank;
`loader.set_epoch(e)` reshuffles; shards are disjoint; training drops the partial last
batch, evaluation keeps it and never duplicates an image. `loader.classes` is the class
list, `loader.bad_files` the undecodable files met this epoch on this rank.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import torch

from ..config import Config, resolve
from .folder import DatasetError, read_exclude, scan_folder

SPLITS = ("train", "val")

# Backends of this version that need an optional package: the install command when missing.
_OPTIONAL = {
    "dali": ("nvidia.dali", "pip install 'fastcls[dali]'  (= nvidia-dali-cuda120; CUDA 13: "
                            "pip install nvidia-dali-cuda130)"),
    "ffcv": ("ffcv", "apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
                     "pip install 'fastcls[ffcv]'"),
}


def dataset_paths(cfg: Config) -> tuple[str, str]:
    """(train, val) folders; `data.demo: true` generates/locates the demo dataset."""
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


def build_loader(cfg: Config, split: str, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, dtype: torch.dtype = torch.float32,
                 classes: Optional[Sequence[str]] = None, path: Optional[str] = None):
    """Build the loader of `split` ("train"|"val") for this rank.

    `classes`: the training class list, required to match for "val". `path` overrides the
    split's folder (default: from the config / demo dataset)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = cfg.data
    check_backend(d.backend)
    batch = resolve(cfg, world_size).batch_size
    train = split == "train"
    if d.backend == "synthetic":
        from .synthetic import SyntheticLoader
        n = d.synthetic_images if train else max(batch * world_size, d.synthetic_images // 10)
        names = list(classes) if classes else [str(i) for i in range(cfg.model.num_classes)]
        return SyntheticLoader(num_images=n, batch_size=batch, world_size=world_size,
                               image_size=d.image_size, num_classes=cfg.model.num_classes,
                               device=device, dtype=dtype, seed=cfg.train.seed + rank, classes=names)
    if d.backend == "ffcv":
        from .ffcv_loader import build_ffcv_loader
        return build_ffcv_loader(cfg, split, device, batch_size=batch, rank=rank,
                                 world_size=world_size, dtype=dtype, classes=classes, path=path)
    if path is None:
        path = dataset_paths(cfg)[SPLITS.index(split)]
    index = scan_folder(path, key=f"data.{split}", classes=classes if not train else None,
                        exclude=read_exclude(d.exclude))
    if d.backend == "dali":
        from .dali import DaliLoader
        return DaliLoader(
            index, train=train, batch_size=batch, image_size=d.image_size, val_resize=d.val_resize,
            scale=d.rrc.scale, ratio=d.rrc.ratio, hflip=d.hflip, workers=d.workers,
            max_bad_fraction=d.max_bad_fraction, device=device, dtype=dtype, rank=rank,
            world_size=world_size, seed=cfg.train.seed,
            prefetch_queue_depth=d.dali.prefetch_queue_depth,
            hw_decoder_load=d.dali.hw_decoder_load)
    if d.native_decode == "batched" or (d.native_decode == "auto" and device.type == "cuda"):
        from .native_batched import BatchedNativeLoader
        return BatchedNativeLoader(
            index, train=train, batch_size=batch, image_size=d.image_size, val_resize=d.val_resize,
            scale=d.rrc.scale, ratio=d.rrc.ratio, hflip=d.hflip, workers=d.workers,
            max_bad_fraction=d.max_bad_fraction, device=device, dtype=dtype, rank=rank,
            world_size=world_size, seed=cfg.train.seed, antialias=d.antialias, decoder=d.decoder,
            timeout=d.timeout)
    from .native import NativeLoader
    return NativeLoader(
        index, train=train, batch_size=batch, image_size=d.image_size, val_resize=d.val_resize,
        scale=d.rrc.scale, ratio=d.rrc.ratio, hflip=d.hflip, workers=d.workers,
        pin_memory=d.pin_memory, max_bad_fraction=d.max_bad_fraction, device=device,
        dtype=dtype, rank=rank, world_size=world_size, seed=cfg.train.seed, timeout=d.timeout)


__all__ = ["build_loader", "dataset_paths", "DatasetError", "read_exclude", "scan_folder"]
