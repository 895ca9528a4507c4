"""Predictions and accuracy counting on the device (no sync until the caller asks for numbers).

One prediction per image, one tie rule: `ranked_classes` orders the classes of each image by
logit, highest first, and ranks equal logits by class index, lowest first. Top-1, top-5, the
confusion matrix and per-class accuracy (fastcls.train.evaluate, fastcls.eval) and
fastcls.predict's top-k all read that one ranking; the training loop's running top-1 uses
`torch.argmax`, whose documented first-maximal-index rule is the same. (torch.topk leaves the
order of ties unspecified: under bf16 autocast, whose logits carry 8 mantissa bits, top-1 by
topk and the confusion matrix by argmax were seen to disagree on tied images.)
"""
from __future__ import annotations

import torch


@torch.no_grad()
def ranked_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """int64 N×min(k, C): the k best classes of each row of N×C `logits`, best first; equal
    logits rank by class index, lower first (a stable sort, in fp32: bf16/fp16 convert exactly)."""
    k = min(k, logits.shape[1])
    return torch.sort(logits.float(), dim=1, descending=True, stable=True).indices[:, :k]


@torch.no_grad()
def top1_class(logits: torch.Tensor) -> torch.Tensor:
    """int64 N: each row's best class by the tie rule of `ranked_classes` (argmax returns the
    first maximal index; cheaper than a sort, for the training loop)."""
    return logits.argmax(dim=1)


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5), *,
                 ranked: torch.Tensor | None = None) -> torch.Tensor:
    """float tensor (len(ks),): number of samples whose label is among their k best classes
    (`ranked_classes`; pass `ranked` when already computed, with at least max(ks) columns or
    all C).

    k larger than the number of classes counts every sample (top-5 of a 3-class problem)."""
    kmax = min(max(ks), logits.shape[1])
    top = ranked_classes(logits, kmax) if ranked is None else ranked[:, :kmax]   # N×kmax
    hit = top.eq(labels.unsqueeze(1))                                             # N×kmax bool
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]).float()
