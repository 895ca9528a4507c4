"""What exact resume needs beyond the weights: where to continue, and every rank's RNG states.

`resume_point` turns a checkpoint into the position to continue from (epoch, step of it,
global step), remapped when the global batch changed (another world size). The data order and
crops are functions of (seed, epoch, sample) and the loader seeks with
`set_epoch(epoch, start_step)`, so the loader's position is just (epoch, epoch_step).
What still depends on history is the global RNGs (dropout, stochastic depth, anything that
draws from torch's default generator, numpy's or Python's): they are captured per rank at
the checkpoint and put back on resume, so a resumed run draws the same numbers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from .config import ConfigError
from .dist import DistInfo


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: `epoch` (in progress when `epoch_step` > 0), `epoch_step`
    (its steps already done), `step` (global optimizer steps done = the schedule's
    position), the best val top-1 so far, and the interrupted epoch's [loss sum, correct,
    images] (`epoch_sums`, None at an epoch boundary). `remapped_from`: the checkpoint's
    global batch when it differs from the run's (not bitwise what an uninterrupted run
    would do)."""
    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    best_top1: float = -1.0
    epoch_sums: Optional[list] = None
    remapped_from: Optional[int] = None


def resume_point(state: Optional[dict], global_batch: int, steps_per_epoch: int,
                 path: object = "the checkpoint") -> ResumePoint:
    """The position stored in a checkpoint `state` (None: a fresh start) for a run with
    `global_batch` images per step and `steps_per_epoch` steps. At another global batch the
    epoch's images already seen stay seen: epoch_step * saved batch // new batch."""
    if state is None:
        return ResumePoint()
    epoch, step, epoch_step = state["epoch"], state["step"], state.get("epoch_step", 0)
    saved = state.get("global_batch", global_batch)
    remapped = None
    if saved != global_batch:
        epoch_step = epoch_step * saved // global_batch
        step = epoch * steps_per_epoch + epoch_step
        remapped = saved
    if epoch_step >= steps_per_epoch:
        raise ConfigError(f"train.resume: {path} stopped at step {epoch_step} of an epoch, but "
                          f"an epoch now has {steps_per_epoch} steps")
    sums = state.get("epoch_sums") if epoch_step else None
    return ResumePoint(epoch, epoch_step, step, state["best_top1"], sums, remapped)


def rng_state() -> dict:
    """This process's RNG states as tensors and plain types (weights_only-loadable). CUDA:
    this process's device only (a rank uses one GPU; saving every visible GPU's state made
    a resume with fewer visible GPUs fail)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(torch.cuda.current_device())
            if torch.cuda.is_initialized() else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state
            dev = torch.cuda.current_device()
            cuda = cuda[dev] if dev < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states(dist: DistInfo) -> Optional[list]:
    """All ranks' states on rank 0 (a collective: every rank must call it); None elsewhere."""
    mine = rng_state()
    if not dist.distributed:
        return [mine]
    out = [None] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out if dist.is_main else None


def restore_rng_states(states: Optional[list], dist: DistInfo) -> bool:
    """Put back this rank's saved states; False (fresh streams) when the checkpoint has
    none or was written by a different number of processes."""
    if not states or len(states) != dist.world_size:
        return False
    set_rng_state(states[dist.rank])
    return True
