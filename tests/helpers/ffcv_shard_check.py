"""Run under `torchrun --nproc_per_node=2 tests/helpers/ffcv_shard_check.py TRAIN.beton OUT.json`.

Each rank builds the ffcv train and val loaders for its rank, reads the sample index that
every image encodes in its colour (see test_ffcv.index_folder), and the ranks all_gather
them over gloo; rank 0 writes what every rank saw per epoch for the test to check."""
import sys

from colour_ids import check_epochs
from ffcv.pipeline.compiler import Compiler  # noqa: E402  (fast: no numba JIT in this check)

from fastcls.config import config_from_dict

Compiler.set_enabled(False)

beton, out = sys.argv[1], sys.argv[2]
cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3},
                        "data": {"backend": "ffcv", "train": beton, "val": beton, "batch_size": 3,
                                 "image_size": 16, "val_resize": 16, "workers": 1}})
check_epochs(cfg, out)
