"""Run under `torchrun --nproc_per_node=2 tests/helpers/accum_equivalence.py DATA OUT.json`.

One epoch of fastcls's own loop (`train_one_epoch`) over gloo DDP, three ways with the same
global batch of 8: (A) 2 micro-batches of 2 per rank with train.accum_steps=2, (B) one batch
of 4 per rank, and (C) one process with batch 8. A DDP comm hook counts the
gradient all-reduces: with `no_sync` on all but the last micro-batch, A all-reduces exactly
as often as B. No BatchNorm (its per-micro-batch statistics would legitimately differ) and
no augmentation (center crops of whole images, no flips)."""
import contextlib
import json
import sys

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from fastcls.config import config_from_dict, resolve
from fastcls.data import build_loader
from fastcls.dist import setup_distributed
from fastcls.log import RunLog
from fastcls.optim import build_optimizer
from fastcls.train import EpochContext, train_one_epoch


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def run(batch, accum, info, world):
    cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3},
                            "data": {"train": data, "batch_size": batch, **NO_AUG},
                            "optim": {"lr": 3.2, "momentum": 0.9, "weight_decay": 1e-4},
                            "train": {"accum_steps": accum, "log_every": 1}})
    res = resolve(cfg, world)
    model, calls = net(), [0]
    if world > 1:
        model = DDP(model)

        def counting(state, bucket):
            calls[0] += 1
            return default_hooks.allreduce_hook(None, bucket)
        model.register_comm_hook(None, counting)
    loader = build_loader(cfg, "train", info.device, rank=info.rank if world > 1 else 0, world_size=world)
    loader.set_epoch(0)
    ctx = EpochContext(model, build_optimizer(cfg.optim, model, res.lr), None, nn.CrossEntropyLoss(),
                       lambda s: res.lr, contextlib.nullcontext, None, cfg, info, RunLog(".", enabled=False))
    stats, steps = train_one_epoch(ctx, loader, epoch=0, step=0)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), steps, calls[0], res, stats


data, out = sys.argv[1], sys.argv[2]
info = setup_distributed("cpu")
NO_AUG = {"hflip": 0.0, "rrc": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "image_size": 32, "workers": 0}
a, steps_a, calls_a, res_a, stats_a = run(2, 2, info, info.world_size)
b, steps_b, calls_b, res_b, stats_b = run(4, 1, info, info.world_size)
gathered = [torch.zeros_like(a) for _ in range(info.world_size)]
tdist.all_gather(gathered, a)
# every rank runs the one-process reference (the loop's end-of-epoch all-reduce of its
# statistics is a collective); only the weights are compared
c, steps_c, _, res_c, _ = run(8, 1, info, 1)
if info.rank == 0:
    result = {"world_size": info.world_size, "steps": [steps_a, steps_b, steps_c],
              "global_batch": [res_a.global_batch_size, res_b.global_batch_size, res_c.global_batch_size],
              "lr": [res_a.lr, res_b.lr, res_c.lr], "allreduce_calls": [calls_a, calls_b],
              "train_loss": [stats_a["train_loss"], stats_b["train_loss"]],
              "rank_diff": max((g - gathered[0]).abs().max().item() for g in gathered),
              "accum_vs_batch": (a - b).abs().max().item(), "accum_vs_single": (a - c).abs().max().item(),
              "moved": (a - torch.cat([p.flatten() for p in net().parameters()])).abs().max().item()}
    with open(out, "w") as f:
        json.dump(result, f)
tdist.barrier()  # rank 1 must not tear gloo down while rank 0 runs the single-process reference
tdist.destroy_process_group()
