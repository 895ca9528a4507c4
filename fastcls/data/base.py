"""What the folder and .beton backends (native, native batched, DALI, FFCV) share behind the
data interface (`fastcls.data`): the epoch order of a `ShardBatchSampler` (len, images per
epoch, `set_epoch(epoch, start_step)`), the per-epoch bad-file limit, ImageNet statistics.
"""
from __future__ import annotations

import math

from .folder import DatasetError
from .sampler import ShardBatchSampler

# ImageNet statistics in 0..255 units.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class LoaderBase:
    """Length, images per epoch and epoch seek from `self.sampler`; bad-file accounting.

    A loader that counts undecodable files sets `max_bad_fraction`; `bad_files` holds the
    "path: reason" strings met this epoch on this rank (reset by the loader per iteration);
    `excluded` counts the files data.exclude dropped before the loader saw them.
    `bad_files_fix` ends the too-many-bad-files message: what to do about them."""

    max_bad_fraction: float
    bad_files_fix = "remove or fix them"
    excluded = 0  # files data.exclude dropped from the list (the folder backends set it)

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, *, train: bool,
                 seed: int):
        self.sampler = ShardBatchSampler(n, batch_size, rank, world_size, train=train, seed=seed)
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def num_images(self) -> int:
        """Images this rank yields per epoch (train: full batches only)."""
        return self.sampler.num_images

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reshuffle for `epoch`; the next iteration starts at batch `start_step` of it
        (mid-epoch resume: the sampler slices its order, nothing is decoded to skip)."""
        self.sampler.set_epoch(epoch, start_step)

    def _account(self, errors: list[str]) -> None:
        """Add a batch's failures to `bad_files`; stop past the limit."""
        if not errors:
            return
        self.bad_files.extend(errors)
        self._check_bad_limit()

    def _check_bad_limit(self) -> None:
        """DatasetError naming the bad files once more than max_bad_fraction of the epoch's
        images are bad."""
        allowed = math.floor(self.max_bad_fraction * self.num_images)
        if len(self.bad_files) > allowed:
            shown = "\n  ".join(self.bad_files[:20])
            raise DatasetError(
                f"{len(self.bad_files)} undecodable files this epoch on this rank, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} of {self.num_images} allows; "
                f"{self.bad_files_fix}:\n  {shown}")
