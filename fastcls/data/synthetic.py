"""The `synthetic` backend: random tensors already on the device, for benchmarks.

It measures the model's step time with no loader at all: one batch is generated once and
yielded `len(loader)` times, so there is no per-step data cost. With progressive resizing
the batch is generated again when `set_epoch` changes the training size.
"""
from __future__ import annotations

import torch

from .base import LoaderSpec, train_image_size, val_image_size


class SyntheticLoader:
    """The data interface (fastcls.data.base.Loader) over one pre-made batch."""

    excluded = 0

    def __init__(self, spec: LoaderSpec):
        d, n_cls = spec.data, spec.num_classes
        self.classes = list(spec.classes) if spec.classes else [str(i) for i in range(n_cls)]
        self.empty_classes: list[str] = []
        # training: data.synthetic_images; evaluation: a tenth of it, at least a global batch
        n = d.synthetic_images if spec.train else max(spec.batch_size * spec.world_size,
                                                      d.synthetic_images // 10)
        self.dataset_size = n
        self.batch_size = spec.batch_size
        self.steps = max(1, n // (spec.batch_size * spec.world_size))
        self.spec, self.data = spec, d
        self.bad_files: list[str] = []
        self.start_step = 0
        self._make_batch(train_image_size(d, 0) if spec.train else val_image_size(d))

    def _make_batch(self, size: int) -> None:
        spec = self.spec
        g = torch.Generator(device=spec.device).manual_seed(spec.seed + spec.rank)
        self.images = torch.randn(spec.batch_size, 3, size, size, generator=g, device=spec.device
                                  ).to(spec.dtype, memory_format=torch.channels_last)
        self.labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=g,
                                    device=spec.device)

    def __len__(self) -> int:
        return self.steps

    @property
    def num_images(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The data is the same every epoch by design; only the start step and, for
        training, the epoch's image size (`train_image_size`) matter."""
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps} batches per epoch")
        self.start_step = start_step
        size = train_image_size(self.data, epoch)
        if self.spec.train and size != self.images.shape[-1]:
            self._make_batch(size)

    def epoch_warnings(self) -> list[str]:
        return []

    def close(self) -> None:
        """Nothing runs in the background."""

    def __iter__(self):
        start, self.start_step = self.start_step, 0  # one iteration only
        for _ in range(start, self.steps):
            yield self.images, self.labels
