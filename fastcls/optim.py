"""Parameter groups and the optimizer factory."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import OPTIMIZERS, OptimConfig



def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Split by structure, not by name (STYLE.md §6): params with ndim <= 1 are the
    biases and the norm layers' affine weights, wherever they sit in the model."""
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """`lr` is the effective (already scaled) peak LR; the schedule overwrites it per step."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    if cfg.name == "sgd":
        # torch's fused SGD: one multi-tensor kernel for all params, on CUDA and on CPU.
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {cfg.name!r}; valid choices: {', '.join(OPTIMIZERS)}")
