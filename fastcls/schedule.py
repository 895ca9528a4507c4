"""Learning-rate schedules as pure functions of the global step (timm's rule: step counts are passed in, never tracked here).

`build_schedule(...)` returns `lr_at(step) -> float`, evaluated every iteration:
an optional linear warmup from `warmup_start_factor * peak` to `peak` over
`warmup_epochs`, then the decay named by `schedule.name`:

- cosine:    final + (peak - final) * (1 + cos(pi * t / T)) / 2 over the post-warmup steps,
             with final = `final_lr_factor * peak` (the guide's preferred default);
- piecewise: peak * gamma ** (number of `milestones` epochs passed) (ResNet-50 standard:
             0.1, x0.1 at epochs 30/60/90);
- constant:  peak;
- polynomial: final + (peak - final) * (1 - t / T) ** power over the post-warmup steps
             (Paddle's PolynomialDecay with end_lr = `final_lr_factor * peak`);
- exponential: peak * exp_gamma ** (t / steps_per_epoch): `exp_gamma` per epoch, applied
             smoothly every step (t counts from the end of the warmup).

Checked against torch.optim.lr_scheduler (CosineAnnealingLR, MultiStepLR, PolynomialLR,
ExponentialLR, LinearLR, SequentialLR) in tests/test_schedule.py.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

from .config import SCHEDULES, ScheduleConfig


def build_schedule(cfg: ScheduleConfig, peak_lr: float, steps_per_epoch: int,
                   epochs: int) -> Callable[[int], float]:
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    start = cfg.warmup_start_factor
    final = cfg.final_lr_factor * peak_lr
    bounds = [m * steps_per_epoch for m in cfg.milestones]

    def decay(step: int) -> float:
        if cfg.name == "cosine":
            span = max(1, total - warmup)
            t = min(step - warmup, span)
            return final + (peak_lr - final) * 0.5 * (1.0 + math.cos(math.pi * t / span))
        if cfg.name == "piecewise":
            return peak_lr * cfg.gamma ** bisect.bisect_right(bounds, step)
        if cfg.name == "constant":
            return peak_lr
        if cfg.name == "polynomial":
            span = max(1, total - warmup)
            t = min(step - warmup, span)
            return final + (peak_lr - final) * (1.0 - t / span) ** cfg.power
        if cfg.name == "exponential":
            return peak_lr * cfg.exp_gamma ** ((step - warmup) / steps_per_epoch)
        raise ValueError(f"unknown schedule {cfg.name!r}; valid choices: {', '.join(SCHEDULES)}")

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak_lr * (start + (1.0 - start) * step / warmup)
        return decay(step)

    return lr_at
