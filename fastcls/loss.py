"""Cross-entropy on soft targets, with label smoothing folded into the targets.

Soft targets are what mixup/cutmix produce as well, so one loss serves every recipe.
Smoothing follows `nn.CrossEntropyLoss(label_smoothing=s)`: the target class gets
1 - s + s/C, every other class s/C.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int64 (N,) labels -> (N, C) probabilities; rows sum to 1."""
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, dtype=dtype, device=labels.device)
    return t.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets_c * log_softmax(logits)_c, computed in fp32."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class SmoothedCrossEntropy(torch.nn.Module):
    """loss(logits, int64 labels); equals nn.CrossEntropyLoss(label_smoothing=smoothing)."""

    def __init__(self, num_classes: int, smoothing: float = 0.0):
        super().__init__()
        self.num_classes, self.smoothing = num_classes, smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """labels: int64 (N,), or float soft targets (N, C) from mixup/cutmix, which already
        carry the smoothing (fastcls.augment folds it in) and are used as they are."""
        if labels.dim() == 2:
            return soft_cross_entropy(logits, labels)
        return soft_cross_entropy(logits, smooth_targets(labels, self.num_classes, self.smoothing))
