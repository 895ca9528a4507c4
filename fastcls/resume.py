"""What exact resume needs beyond the weights: every rank's RNG states.

The data order and crops are functions of (seed, epoch, sample) and the loader seeks with
`set_epoch(epoch, start_step)`, so the loader's position is just (epoch, epoch_step).
What still depends on history is the global RNGs (dropout, stochastic depth, anything that
draws from torch's default generator, numpy's or Python's): they are captured per rank at
the checkpoint and put back on resume, so a resumed run draws the same numbers.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from .dist import DistInfo


def rng_state() -> dict:
    """This process's RNG states as tensors and plain types (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
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
