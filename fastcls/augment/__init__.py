"""Batched on-device augmentations, run after any loader (docs/augment.md).

    augmenter = build_augmenter(cfg.augment, num_classes, seed=cfg.train.seed, rank=rank)
    images, targets = augmenter(images, labels, epoch, step)   # in the training loop

Each augmentation is a pure function `f(images, labels, generator, **params) -> (images,
targets)` (mix.py, erase.py, policy.py) plus a YAML sub-section of `augment:`. Order in the
chain, and why:

1. `autoaugment`, `randaugment`: uint8 semantics; de-normalize -> uint8 -> ops -> normalize,
   all on the device (PaddleClas applies them to the uint8 crop, before normalization);
2. `cutout`, `random_erasing`, `gridmask`, `hide_and_seek`: on the normalized batch, so the
   constant fill 0 is the mean colour (PaddleClas: after NormalizeImage);
3. `mixup` (mixup + cutmix): last, on the batch (PaddleClas: batch-level operator).

Randomness: every step and every augmentation gets its own `torch.Generator` on the
training device, seeded from (train.seed, rank, epoch, step, index in the chain); a resumed
run (whole epochs, or from a mid-epoch step) therefore repeats the same stream with no
generator state in the checkpoint.

Targets: int64 labels (N,) when no mixing happens this epoch (label smoothing is then the
loss's job, = nn.CrossEntropyLoss(label_smoothing)), otherwise float32 soft targets (N, C)
with `augment.label_smoothing` folded in. `dominant_label(targets)` gives the label train
accuracy is measured against (argmax of the soft target: the label with the larger share).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch

from .erase import cutout, gridmask, hide_and_seek, random_erasing
from .mix import mixup_cutmix
from .policy import autoaugment, randaugment

__all__ = ["Augmenter", "build_augmenter", "dominant_label", "step_generator", "autoaugment",
           "randaugment", "cutout", "random_erasing", "gridmask", "hide_and_seek", "mixup_cutmix"]


def step_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A torch.Generator on `device` seeded from integer keys (seed, rank, epoch, step, index).
    SeedSequence mixes the keys so neighbouring steps get unrelated streams."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    g = torch.Generator(device=device)
    g.manual_seed(seed & ((1 << 63) - 1))
    return g


def dominant_label(targets: torch.Tensor) -> torch.Tensor:
    """int64 (N,): the labels themselves, or the argmax of soft targets (N, C)."""
    return targets if targets.dim() == 1 else targets.argmax(dim=1)


class Augmenter:
    """The configured chain; `augmenter(images, labels, epoch, step) -> (images, targets)`.

    images: float N×3×H×W normalized, channels_last, on the training device (fp32 or the AMP
    dtype); labels: int64 (N,) on the same device. Output images keep dtype and layout."""

    def __init__(self, steps: list[tuple[str, Callable]], mix: Callable | None, mix_off_epoch: int,
                 seed: int = 0, rank: int = 0):
        self.steps, self.mix, self.mix_off_epoch = steps, mix, mix_off_epoch
        self.seed, self.rank = seed, rank

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.steps] + (["mixup"] if self.mix else [])

    def mixing(self, epoch: int) -> bool:
        """timm's mixup_off_epoch: mixing stops from epoch `off_epoch` on (0 = never stops)."""
        return self.mix is not None and not (self.mix_off_epoch and epoch >= self.mix_off_epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int):
        if not self.steps and not self.mixing(epoch):
            return images, labels
        dev = images.device
        for i, (_, fn) in enumerate(self.steps):
            images, labels = fn(images, labels, step_generator(dev, self.seed, self.rank, epoch, step, i))
        if self.mixing(epoch):
            g = step_generator(dev, self.seed, self.rank, epoch, step, len(self.steps))
            images, labels = self.mix(images, labels, g)
        return images, labels


def build_augmenter(cfg, num_classes: int, seed: int = 0, rank: int = 0) -> Augmenter:
    """From `cfg` = the `augment` section (fastcls.config.AugmentConfig)."""
    steps: list[tuple[str, Callable]] = []
    if cfg.autoaugment.enabled:
        steps.append(("autoaugment", partial(autoaugment, policy=cfg.autoaugment.policy)))
    ra = cfg.randaugment
    if ra.enabled:
        steps.append(("randaugment", partial(randaugment, num_ops=ra.num_ops, magnitude=ra.magnitude,
                                             num_magnitude_bins=ra.num_magnitude_bins,
                                             magnitude_std=ra.magnitude_std)))
    c = cfg.cutout
    if c.enabled:
        steps.append(("cutout", partial(cutout, n_holes=c.n_holes, length=c.length, prob=c.prob)))
    r = cfg.random_erasing
    if r.enabled:
        steps.append(("random_erasing", partial(random_erasing, prob=r.prob, area=r.area, aspect=r.aspect,
                                                log_aspect=r.log_aspect, count=r.count,
                                                attempts=r.attempts, fill=r.fill)))
    gm = cfg.gridmask
    if gm.enabled:
        steps.append(("gridmask", partial(gridmask, d1=gm.d1, d2=gm.d2, ratio=gm.ratio, rotate=gm.rotate,
                                          mode=gm.mode, prob=gm.prob)))
    hs = cfg.hide_and_seek
    if hs.enabled:
        steps.append(("hide_and_seek", partial(hide_and_seek, grid_sizes=tuple(hs.grid_sizes),
                                               hide_prob=hs.hide_prob)))
    m = cfg.mixup
    mix = None
    if m.mixup_alpha > 0 or m.cutmix_alpha > 0:
        mix = partial(mixup_cutmix, num_classes=num_classes, mixup_alpha=m.mixup_alpha,
                      cutmix_alpha=m.cutmix_alpha, cutmix_minmax=m.cutmix_minmax, prob=m.prob,
                      switch_prob=m.switch_prob, mode=m.mode, correct_lam=m.correct_lam,
                      label_smoothing=cfg.label_smoothing)
    return Augmenter(steps, mix, m.off_epoch, seed=seed, rank=rank)
