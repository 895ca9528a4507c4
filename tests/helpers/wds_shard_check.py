"""Run under `torchrun --nproc_per_node=2 tests/helpers/wds_shard_check.py SHARDS OUT.json`.

Each rank builds the shard train and val loaders for its rank (one worker each), reads the
sample index that every image encodes in its colour (see test_wds.index_folder), and the
ranks all_gather them over gloo; rank 0 writes what every rank saw for the test to check."""
import gc
import json
import sys

import torch
import torch.distributed as tdist

from fastcls.config import config_from_dict
from fastcls.data import build_loader
from fastcls.dist import setup_distributed

shards, out = sys.argv[1], sys.argv[2]
dist = setup_distributed("cpu")
torch.set_num_threads(1)
cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3},
                        "data": {"train": shards, "val": shards, "batch_size": 4, "image_size": 16,
                                 "val_resize": 16, "workers": 1, "wds": {"shuffle_buffer": 8}}})
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3) * 255


def indices(loader) -> list[int]:
    """Sample index = R + 256 * G of the (solid-colour) image."""
    got = []
    for x, _ in loader:
        rgb = (x[:, :, 0, 0] * STD + MEAN).round().long()
        got += (rgb[:, 0] + 256 * rgb[:, 1]).tolist()
    return got


train = build_loader(cfg, "train", dist.device, rank=dist.rank, world_size=dist.world_size)
val = build_loader(cfg, "val", dist.device, rank=dist.rank, world_size=dist.world_size,
                   classes=train.classes)
mine = {"len": len(train), "val_len": len(val)}
for epoch in (0, 1):
    train.set_epoch(epoch)
    mine[f"train{epoch}"] = indices(train)
train.set_epoch(1, 2)
mine["resumed"] = indices(train)
mine["val"] = indices(val)
everyone = [None] * dist.world_size
tdist.all_gather_object(everyone, mine)
if dist.rank == 0:
    with open(out, "w") as f:
        json.dump({"world_size": dist.world_size, "ranks": everyone}, f)
del train, val
gc.collect()  # workers down before the process group
tdist.barrier()  # nobody tears gloo down while a peer still works
tdist.destroy_process_group()
