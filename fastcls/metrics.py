"""Accuracy counting on the device (no sync until the caller asks for numbers)."""
from __future__ import annotations

import torch


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """float tensor (len(ks),): number of samples whose label is in the top-k logits.

    k larger than the number of classes counts every sample (top-5 of a 3-class problem)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices            # N×kmax
    hit = top.eq(labels.unsqueeze(1))                 # N×kmax bool
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]).float()
