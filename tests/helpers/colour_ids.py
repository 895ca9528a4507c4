"""Shared by the torchrun shard checks: the sample index a solid-colour test image encodes
(R + 256 G, see test_ffcv.index_folder / test_shards.index_folder), read from normalized batches."""
import torch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3) * 255


def indices(loader) -> list[int]:
    """Sample index = R + 256 * G of each (solid-colour) image the loader yields."""
    got = []
    for x, _ in loader:
        rgb = (x[:, :, 0, 0] * STD + MEAN).round().long()
        got += (rgb[:, 0] + 256 * rgb[:, 1]).tolist()
    return got


def check_epochs(cfg, out: str, resume_step: int = 0) -> None:
    """Under torchrun (gloo): this rank's train loader's sample indices of epochs 0 and 1 (and
    epoch 1 from batch `resume_step` when > 0) and its val loader's, gathered; rank 0 writes
    {"world_size", "ranks": [{"len", "val_len", "train0", "train1", ["resumed"], "val"}]}."""
    import gc
    import json

    import torch.distributed as tdist

    from fastcls.data import build_loader
    from fastcls.dist import setup_distributed
    dist = setup_distributed("cpu")
    torch.set_num_threads(1)
    train = build_loader(cfg, "train", dist.device, rank=dist.rank, world_size=dist.world_size)
    val = build_loader(cfg, "val", dist.device, rank=dist.rank, world_size=dist.world_size,
                       classes=train.classes)
    mine = {"len": len(train), "val_len": len(val)}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        mine[f"train{epoch}"] = indices(train)
    if resume_step:
        train.set_epoch(1, resume_step)
        mine["resumed"] = indices(train)
    mine["val"] = indices(val)
    everyone = [None] * dist.world_size
    tdist.all_gather_object(everyone, mine)
    if dist.rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": dist.world_size, "ranks": everyone}, f)
    del train, val
    gc.collect()  # workers down before the process group
    tdist.barrier()  # nobody tears gloo down while a peer still works (seen: SIGABRT in rank 1)
    tdist.destroy_process_group()
