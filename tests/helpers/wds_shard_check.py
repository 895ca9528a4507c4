"""Run under `torchrun --nproc_per_node=2 tests/helpers/wds_shard_check.py SHARDS OUT.json`.

Each rank builds the shard train and val loaders for its rank (one worker each), reads the
sample index that every image encodes in its colour (see test_shards.index_folder), and the
ranks all_gather them over gloo; rank 0 writes what every rank saw for the test to check."""
import sys

from colour_ids import check_epochs

from fastcls.config import config_from_dict

shards, out = sys.argv[1], sys.argv[2]
cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3},
                        "data": {"train": shards, "val": shards, "batch_size": 4, "image_size": 16,
                                 "val_resize": 16, "workers": 1, "wds": {"shuffle_buffer": 8}}})
check_epochs(cfg, out, resume_step=2)
