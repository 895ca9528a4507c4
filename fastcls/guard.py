"""Stop a diverged run: a NaN/inf training loss names the step, the LR and the checkpoint.

    guard = LossGuard(device)
    ... every step:        guard.observe(loss, step)      # device ops only, no sync
    ... every log_every:   guard.check(lr_at, last_ckpt)  # one sync, raises NonFiniteLoss

The first non-finite step is recorded on the device (a `where` per step), so the report
names the exact step although the host looks only every train.log_every steps: detection
latency is up to log_every steps. With fp16 + GradScaler, steps whose *gradients*
overflow are skipped by the scaler and their loss is finite, so they never trip this;
a non-finite *loss* in fp16 is also skipped by the scaler, so there the run stops only when
the loss is still non-finite at the check (the scaler could not recover).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as tdist

_NONE = 2**62  # "no bad step yet" for the MIN reduction


class NonFiniteLoss(RuntimeError):
    pass


class LossGuard:
    def __init__(self, device: torch.device, scaler_skips: bool = False):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.last_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.scaler_skips = scaler_skips

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.last_bad = bad

    def check(self, lr_at: Callable[[int], float], last_checkpoint: Optional[str]) -> None:
        """Raise NonFiniteLoss on every rank alike (ranks' losses differ, so the flags are
        reduced over ranks: a rank stopping alone would leave the others in a collective)."""
        first = torch.where(self.first_bad < 0, _NONE, self.first_bad)
        last = self.last_bad.long()
        if tdist.is_initialized():
            tdist.all_reduce(first, op=tdist.ReduceOp.MIN)
            tdist.all_reduce(last, op=tdist.ReduceOp.MAX)
        first, last = torch.stack([first, last]).tolist()  # one sync, every log_every steps
        first = -1 if first == _NONE else first
        if first < 0 or (self.scaler_skips and not last):
            self.first_bad.fill_(-1)
            return
        ckpt = last_checkpoint or "none written yet"
        raise NonFiniteLoss(f"training loss is NaN/inf at step {first} (lr {lr_at(first):.4g}); "
                            f"stopped. Last checkpoint: {ckpt}. Lower optim.lr, raise "
                            f"schedule.warmup_epochs or use train.amp=bf16, then resume from it")
