"""Exponential moving average of the weights (`train.ema`), by timm's ModelEmaV3 rule.

    ema = ModelEma(raw_model, decay=0.9998, every=1, warmup=False)
    ... after optimizer step number s (from 1):  ema.step(raw_model, s)
    evaluate(ema.module, ...); state["ema"] = ema.module.state_dict()

What is averaged, as timm's `ModelEmaV3.apply_update_`: every floating-point entry of the
model's state_dict (parameters and BatchNorm running_mean/running_var) is lerped toward the
live model's, integer entries (BatchNorm num_batches_tracked) are copied. The decay of the
k-th update (k from 1) is timm's `get_decay(step=k)`: 0 at k = 1 (the first update copies
the model), then `decay`, or with `warmup` min(decay, 1 - k ** -2/3) (timm's
warmup_gamma=1, warmup_power=2/3). Updates happen after every `every`-th optimizer step.

Written here rather than using timm's class because the trainer needs what it does not
keep or offer across timm versions: the update counter in checkpoints (exact resume), the
every-N rule, and a fixed list of tensors built once (no state_dict() per update). Tested
against timm's ModelEmaV3 fed the same weight sequence (tests/test_fast.py).

No host-device sync: one `torch._foreach_lerp_` (and `_foreach_copy_`) over tensors that
stay on the device, with the decay a Python float. The average is of the unwrapped model
(no DDP `module.` or torch.compile `_orig_mod.` prefixes), so `state_dict()` has the keys of
the checkpoint's "model".
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma:
    """The EMA copy of `model` (`module`, eval mode, no grads) and its update counter."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.warmup = decay, every, warmup
        self.updates = 0  # EMA updates done (timm's `step` of the last update)
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        """Pair the EMA's state tensors with the live model's, once: parameters and buffers
        are updated in place by the optimizer, BatchNorm and load_state_dict, so the pairs
        stay valid for the life of the models."""
        ema, live = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        if list(ema) != list(live):
            raise ValueError("EMA: the model's state_dict keys differ from the EMA copy's")
        pairs = [(ema[k].data, live[k].data) for k in ema]
        self._float = ([e for e, m in pairs if e.is_floating_point()],
                       [m for e, m in pairs if e.is_floating_point()])
        self._other = ([e for e, m in pairs if not e.is_floating_point()],
                       [m for e, m in pairs if not e.is_floating_point()])

    def decay_at(self, k: int) -> float:
        """Decay of update number k (from 1), timm's ModelEmaV3.get_decay(step=k)."""
        k = max(0, k - 1)
        if k <= 0:
            return 0.0
        if self.warmup:
            return max(min(1.0 - (1.0 + k) ** (-2.0 / 3.0), self.decay), 0.0)
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update from the live model's current state."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        if self._float[0]:
            torch._foreach_lerp_(self._float[0], self._float[1], weight)
        if self._other[0]:
            torch._foreach_copy_(self._other[0], self._other[1])

    def step(self, step: int) -> None:
        """Call after optimizer step number `step` (global, from 1): updates every N-th."""
        if step % self.every == 0:
            self.update()

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
