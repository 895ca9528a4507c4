"""Checkpoints: written atomically, read back with plain-type unpickling only.

A checkpoint is a dict: `model` (unwrapped state_dict), `optimizer`, `scaler` (or None),
`epoch` (the next epoch to run), `step` (global optimizer steps done), `classes`,
`best_top1`, `config` (the resolved config as a plain dict).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .data.folder import DatasetError


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`: a crash
    at any point leaves either the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike) -> dict:
    # weights_only: checkpoints hold tensors and plain Python types, nothing executable.
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume(resume: str, out_dir: str | os.PathLike) -> Optional[Path]:
    """`""` -> None; `auto` -> out_dir/last.pt if it exists; else the given path (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        p = Path(out_dir) / "last.pt"
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"train.resume: checkpoint {resume!r} does not exist")
    return p


def save_epoch(out_dir: str | os.PathLike, model: nn.Module, optimizer, scaler, *, epoch: int,
               step: int, classes: Sequence[str], best_top1: float, config: dict,
               is_best: bool) -> None:
    """last.pt every epoch; best.pt too when this epoch's evaluation is the best so far."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": epoch, "step": step, "classes": list(classes),
             "best_top1": best_top1, "config": config}
    save_atomic(state, Path(out_dir) / "last.pt")
    if is_best:
        save_atomic(state, Path(out_dir) / "best.pt")


def restore(path: str | os.PathLike, model: nn.Module, optimizer, scaler,
            classes: Sequence[str]) -> tuple[int, int, float]:
    """Load a checkpoint into model/optimizer/scaler; returns (epoch, step, best_top1)."""
    state = load(path)
    if state["classes"] != list(classes):
        raise DatasetError(f"train.resume: {path} was trained on other classes "
                           f"({len(state['classes'])}) than data.train ({len(classes)})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["epoch"], state["step"], state["best_top1"]
