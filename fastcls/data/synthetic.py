"""The `synthetic` backend: random tensors already on the device, for benchmarks.

It measures the model's step time with no loader at all: one batch is generated once and
yielded `len(loader)` times, so there is no per-step data cost.
"""
from __future__ import annotations

import torch


class SyntheticLoader:
    def __init__(self, *, num_images: int, batch_size: int, world_size: int, image_size: int,
                 num_classes: int, device: torch.device, dtype: torch.dtype, seed: int,
                 classes: list[str]):
        self.classes = classes
        self.dataset_size = num_images
        self.batch_size = batch_size
        self.steps = max(1, num_images // (batch_size * world_size))
        g = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=g,
                                  device=device).to(dtype, memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g, device=device)
        self.bad_files: list[str] = []
        self.start_step = 0

    def __len__(self) -> int:
        return self.steps

    @property
    def num_images(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The data is the same every epoch by design; only the start step matters."""
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps} batches per epoch")
        self.start_step = start_step

    def __iter__(self):
        start, self.start_step = self.start_step, 0  # one iteration only
        for _ in range(start, self.steps):
            yield self.images, self.labels
