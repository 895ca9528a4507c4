"""Run under `torchrun --nproc_per_node=2 tests/helpers/ddp_equivalence.py DATA OUT.json`.

Trains 3 DDP steps over gloo with fastcls's sharded loader at per-rank batch B=2, then
rank 0 checks that every rank holds the same weights and that they equal a single process
trained with batch 2B=4 (no augmentation: full-image center crops, no flips; the global
batch is the union of the ranks' shards). Each side's LR comes from config.resolve for its
own world size, so the test covers gradient averaging, sharding and LR scaling together.
The model has no BatchNorm, whose per-rank batch statistics would legitimately differ."""
import json
import sys

import torch
import torch.distributed as tdist
import torch.nn as nn

from fastcls.config import config_from_dict, resolve
from fastcls.data import build_loader
from fastcls.dist import setup_distributed
from fastcls.optim import build_optimizer
from fastcls.train import wrap_for_training

STEPS = 3


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def train(model, loader, lr):
    opt = build_optimizer(cfg.optim, model, lr=lr)
    it = iter(loader)
    for _ in range(STEPS):
        x, y = next(it)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


data, out = sys.argv[1], sys.argv[2]
info = setup_distributed("cpu")
NO_AUG = {"hflip": 0.0, "rrc": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "image_size": 32, "workers": 0}
tree = {"model": {"name": "resnet_tiny", "num_classes": 3},
        "data": {"train": data, "batch_size": 2, **NO_AUG},   # per process: B
        "optim": {"lr": 6.4, "momentum": 0.9, "weight_decay": 1e-4}}  # 6.4 per 256 -> 0.1 at 4
cfg = config_from_dict(tree)
single_cfg = config_from_dict({**tree, "data": {**tree["data"], "batch_size": 4}})  # one process: 2B
lr_ddp, lr_single = resolve(cfg, info.world_size).lr, resolve(single_cfg, 1).lr
loader = build_loader(cfg, "train", info.device, rank=info.rank, world_size=info.world_size)
flat = train(wrap_for_training(net(), cfg, info), loader, lr_ddp)  # the trainer's DDP wrap
gathered = [torch.zeros_like(flat) for _ in range(info.world_size)]
tdist.all_gather(gathered, flat)
if info.rank == 0:
    single = train(net(), build_loader(single_cfg, "train", info.device, rank=0, world_size=1), lr_single)
    result = {"world_size": info.world_size, "lr_ddp": lr_ddp, "lr_single": lr_single,
              "rank_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
              "single_diff": (gathered[0] - single).abs().max().item(),
              "moved": (gathered[0] - torch.cat([p.flatten() for p in net().parameters()])).abs().max().item()}
    with open(out, "w") as f:
        json.dump(result, f)
# Rank 1 would otherwise tear gloo down while rank 0 still trains the single-process
# reference; seen under load as "terminate called without an active exception" in rank 1.
tdist.barrier()
tdist.destroy_process_group()
