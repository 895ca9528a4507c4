"""Train an image classifier from one YAML recipe.

    python -m fastcls.train pipelines/demo.yaml
    python -m fastcls.train pipelines/resnet50_bs256.yaml data.train=/d/train data.val=/d/val
    torchrun --nproc_per_node=8 -m fastcls.train pipelines/imagenet_bs4096.yaml data.train=...
    python -m fastcls.train CONFIG --print-config [--world-size 16]

Reads top to bottom: setup, data, model, optimizer, resume, loop (train, eval, checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import finetune
from .augment import build_augmenter, dominant_label
from .diagnose import diagnose, train_acc_source
from .config import Config, ConfigError, Resolved, load_config, resolve, to_dict
from .data import DatasetError, build_loader, dataset_paths, read_exclude, scan_folder
from .dist import (DistInfo, all_reduce_sum, barrier, cleanup_distributed, setup_distributed,
                   world_size_from_env)
from .guard import LossGuard, NonFiniteLoss
from .log import RunLog
from .loss import SmoothedCrossEntropy
from .metrics import topk_correct
from .models import build_model
from .optim import build_optimizer
from .preempt import EXIT_PREEMPTED, Preempted, Preemption, slurm_requeue
from .resume import gather_rng_states, restore_rng_states
from .schedule import build_schedule

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# ============================================================================ CLI

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastcls.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML recipe, e.g. pipelines/demo.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config (effective LR, batches, steps) and exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --print-config: resolve for this many processes "
                        "(default: $WORLD_SIZE or 1)")
    return p.parse_intermixed_args(argv)  # options may follow the overrides


def count_train_images(cfg: Config) -> tuple[Optional[int], str]:
    """(number of training images or None, a note when unknown)."""
    if cfg.data.backend == "synthetic":
        return cfg.data.synthetic_images, ""
    try:
        if cfg.data.backend == "ffcv":  # the converter's sidecar holds the count (no ffcv import)
            from .data.ffcv_loader import read_meta
            return int(read_meta(dataset_paths(cfg)[0], "data.train")["num_samples"]), ""
        return len(scan_folder(dataset_paths(cfg)[0], key="data.train",
                               exclude=read_exclude(cfg.data.exclude)).samples), ""
    except DatasetError as e:
        return None, str(e)


def resolved_tree(cfg: Config, res: Resolved) -> dict:
    tree = to_dict(cfg)
    tree["resolved"] = res.as_dict(cfg)
    return tree


def print_config(cfg: Config, world_size: int) -> int:
    n, note = count_train_images(cfg)
    res = resolve(cfg, world_size, n)
    sys.stdout.write(yaml.safe_dump(resolved_tree(cfg, res), sort_keys=False))
    if note:
        print(f"# steps_per_epoch unknown: {note}")
    warning = finetune.lr_warning(cfg, n)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg, args.world_size or world_size_from_env())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = setup_distributed(cfg.train.device)
    try:
        train(cfg, dist)
        return 0
    except (ConfigError, DatasetError, FileNotFoundError, ckpt.CheckpointError) as e:
        print(f"error (rank {dist.rank}): {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error (rank {dist.rank}): {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"preempted (rank {dist.rank}): {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        # Free the loaders now (they sit in reference cycles) so their DataLoader workers
        # shut down cleanly, not via multiprocessing's exit-time terminate(), which a worker
        # outlives by 30 s (it must survive SLURM's SIGTERM: see data/native.py _worker_init).
        gc.collect()
        cleanup_distributed()


# ============================================================================ the run

def train(cfg: Config, dist: DistInfo) -> dict:
    """Run the recipe; returns the last metrics record."""
    # ------------------------------------------------------------------ setup
    device = dist.device
    out_dir = Path(cfg.train.out_dir or f"runs/{cfg.name}")
    log = RunLog(out_dir, enabled=dist.is_main, progress=cfg.train.progress)
    amp_dtype = AMP_DTYPES[cfg.train.amp]
    # Loader output dtype: the AMP dtype on GPU halves the bytes moved; fp32 on CPU.
    data_dtype = amp_dtype if (amp_dtype is not None and device.type == "cuda") else torch.float32
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP broadcasts anyway)
    if cfg.train.deterministic:  # bitwise-reproducible kernels (slower on GPU)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # ------------------------------------------------------------------ data
    train_loader = build_loader(cfg, "train", device, rank=dist.rank, world_size=dist.world_size,
                                dtype=data_dtype)
    val_loader = build_loader(cfg, "val", device, rank=dist.rank, world_size=dist.world_size,
                              dtype=data_dtype, classes=train_loader.classes)
    classes = list(train_loader.classes)
    if len(classes) > cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.train has "
                          f"{len(classes)} classes; set model.num_classes={len(classes)}")
    if len(classes) < cfg.model.num_classes and cfg.data.backend != "synthetic":
        log.warn(f"model.num_classes={cfg.model.num_classes} > {len(classes)} classes in data.train")
    for loader, split in ((train_loader, "train"), (val_loader, "val")):
        if getattr(loader, "excluded", 0):
            log.info(f"data.exclude: skipped {loader.excluded} listed files in data.{split}")
    for name in getattr(train_loader, "empty_classes", []):
        log.warn(f"class folder {name!r} has no images")
    res = resolve(cfg, dist.world_size, train_loader.dataset_size)
    assert res.steps_per_epoch == len(train_loader), (res.steps_per_epoch, len(train_loader))
    log.write_config(resolved_tree(cfg, res))
    log.info(f"fastcls: {cfg.name} on {device} x{dist.world_size} | {res.train_images} train images, "
             f"{len(classes)} classes | global batch {res.global_batch_size} "
             f"({res.batch_size}/process) | lr {res.lr:.4g} | {res.steps_per_epoch} steps/epoch "
             f"| out {out_dir}")

    # ------------------------------------------------------------------ model
    model = build_model(cfg.model.name, cfg.model.num_classes)
    if cfg.model.pretrained:  # fine-tuning (TRICKS.md §9); a resume below overrides it
        log.info(str(finetune.load_pretrained(model, cfg.model.pretrained, cfg.model.num_classes)))
        warning = finetune.lr_warning(cfg, res.train_images)
        if warning:
            log.warn(warning)
    elif cfg.model.freeze_epochs:
        log.warn(f"model.freeze_epochs={cfg.model.freeze_epochs} without model.pretrained: "
                 f"the frozen backbone is randomly initialized")
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.train.seed + dist.rank)  # per-rank stream for dropout etc.

    # ------------------------------------------------------------------ optimizer, schedule, loss
    optimizer = build_optimizer(cfg.optim, model, res.lr)
    lr_at = build_schedule(cfg.schedule, res.lr, res.steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    criterion = SmoothedCrossEntropy(cfg.model.num_classes, cfg.augment.label_smoothing)
    augmenter = build_augmenter(cfg.augment, cfg.model.num_classes, seed=cfg.train.seed, rank=dist.rank)
    if augmenter.names:
        log.info(f"augment on {device}: {' -> '.join(augmenter.names)}")

    # ------------------------------------------------------------------ resume
    start_epoch, epoch_step, step, best_top1, carry = 0, 0, 0, -1.0, None
    resume_path, state = ckpt.load_resume(cfg.train.resume, out_dir, warn=log.warn)
    if state is not None:
        ckpt.restore_state(state, resume_path, model, optimizer, scaler, classes)
        start_epoch, step, best_top1 = state["epoch"], state["step"], state["best_top1"]
        epoch_step = state.get("epoch_step", 0)
        carry = state.get("epoch_sums") if epoch_step else None  # the epoch's stats so far
        saved_batch = state.get("global_batch", res.global_batch_size)
        if saved_batch != res.global_batch_size:  # other world size: same images, other steps
            epoch_step = epoch_step * saved_batch // res.global_batch_size
            step = start_epoch * res.steps_per_epoch + epoch_step
            log.warn(f"checkpoint was written at global batch {saved_batch}, now "
                     f"{res.global_batch_size}: continuing at step {epoch_step} of the epoch "
                     f"(not bitwise what an uninterrupted run would do)")
        if epoch_step >= res.steps_per_epoch:
            raise ConfigError(f"train.resume: {resume_path} stopped at step {epoch_step} of an "
                              f"epoch, but an epoch now has {res.steps_per_epoch} steps")
        if start_epoch >= cfg.model.freeze_epochs > 0:  # saved while frozen: classifier-only state
            finetune.fill_momentum_buffers(optimizer)
        if not restore_rng_states(state.get("rng"), dist):
            log.warn("checkpoint has no RNG states for this number of processes: fresh RNG streams")
        log.info(f"resumed from {resume_path}: epoch {start_epoch + 1}, step {epoch_step} of it, "
                 f"global step {step}, lr {lr_at(step):.4g}")
    last_ckpt = [str(resume_path) if resume_path else None]

    def save(epoch: int, epoch_step: int, step: int, is_best: bool = False,
             epoch_sums: Optional[list] = None) -> None:
        """Checkpoint on rank 0 (the RNG gather is a collective: every rank calls this).
        Mid-epoch, `epoch_sums` (loss sum, correct, images over all ranks so far) let the
        resumed run report the whole epoch's train_loss/train_top1."""
        rng = gather_rng_states(dist)
        if dist.is_main:
            state = ckpt.make_state(raw_model, optimizer, scaler, epoch=epoch, epoch_step=epoch_step,
                                    step=step, classes=classes, best_top1=best_top1,
                                    config=to_dict(cfg), rng=rng)
            state["global_batch"] = res.global_batch_size  # to map epoch_step to another world size
            if epoch_step:
                state["epoch_sums"] = epoch_sums
            last_ckpt[0] = str(ckpt.save_checkpoint(out_dir, state, keep=cfg.train.keep_checkpoints,
                                                    is_best=is_best))

    def preempted(epoch: int, epoch_step: int, step: int, epoch_sums=None) -> Preempted:
        save(epoch, epoch_step, step, epoch_sums=epoch_sums)
        barrier()  # the checkpoint is on disk before anyone is requeued or exits
        where = f"epoch {epoch + 1}, step {epoch_step} of it"
        requeued = dist.is_main and cfg.train.slurm_requeue and slurm_requeue(log.warn)
        log.warn(f"{stop.requested or 'signal'} received: checkpoint at {where} in {last_ckpt[0]}; "
                 + ("SLURM job requeued" if requeued else "resume with train.resume=auto"))
        return Preempted(f"checkpoint at {where}")

    # ------------------------------------------------------------------ wrap
    raw_model = eval_model = model
    # Frozen before the DDP wrap: DDP then leaves the frozen params out of its reducer.
    frozen = start_epoch < cfg.model.freeze_epochs and \
        finetune.set_backbone_frozen(raw_model, cfg.model.num_classes, True) > 0
    model = wrap_for_training(raw_model, cfg, dist)
    if cfg.model.compile:
        eval_model = torch.compile(eval_model)
    fit_source = train_acc_source(cfg)
    clean_loader = clean_train_loader(cfg, device, dist, data_dtype, classes) \
        if fit_source == "clean" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    # ------------------------------------------------------------------ loop
    record: dict = {}
    guard = LossGuard(device, scaler_skips=scaler is not None)
    with Preemption(dist, check_every=cfg.train.log_every) as stop:  # SIGUSR1/SIGTERM handlers
        for epoch in range(start_epoch, cfg.train.epochs):
            if frozen and epoch >= cfg.model.freeze_epochs:
                finetune.set_backbone_frozen(raw_model, cfg.model.num_classes, False)
                finetune.fill_momentum_buffers(optimizer)
                model, frozen = wrap_for_training(raw_model, cfg, dist), False  # DDP sees all params
                log.info(f"epoch {epoch + 1}: backbone unfrozen "
                         f"(model.freeze_epochs={cfg.model.freeze_epochs})")
            first = epoch_step if epoch == start_epoch else 0
            train_loader.set_epoch(epoch, first)
            stats, step = train_one_epoch(
                model, train_loader, optimizer, scaler, criterion, lr_at, step, epoch, autocast, cfg,
                dist, log, augmenter=augmenter, start_step=first, stop=stop, guard=guard, last_ckpt=last_ckpt,
                save=lambda i, s, sums, e=epoch: save(e, i, s, epoch_sums=sums),
                carry=carry if epoch == start_epoch else None)
            done, sums = stats.pop("epoch_steps"), stats.pop("epoch_sums")
            if done < len(train_loader):
                raise preempted(epoch, done, step, sums)
            val, is_best = None, False
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                val = evaluate(eval_model, val_loader, autocast, dist)
                is_best = val["val_top1"] > best_top1
                best_top1 = max(best_top1, val["val_top1"])
            save(epoch + 1, 0, step, is_best)  # every epoch, + every train.checkpoint_every steps
            if val is not None:
                record = {"epoch": epoch + 1, **stats, **val, "lr": lr_at(max(step - 1, 0))}
                fit = diagnose_fit(fit_source, stats, val, eval_model, clean_loader, autocast, cfg, dist)
                if fit is not None:
                    record.update(fit.as_record())
                log.metrics(record, quiet=("fit_advice",))
                if fit is not None:
                    log.info(fit.line)
            if epoch + 1 < cfg.train.epochs and stop.agreed_now():  # signal during evaluation
                raise preempted(epoch + 1, 0, step)
    curves = log.plot()
    log.info(f"done: best val top-1 {best_top1:.2f}% | run folder {out_dir}"
             + (f" | curves {curves}" if curves else ""))
    # Ranks leave together: a gloo rank tearing the group down while rank 0 still plots or
    # writes was seen aborting ("terminate called without an active exception").
    barrier()
    return record


def wrap_for_training(raw_model, cfg: Config, dist: DistInfo):
    """DDP (over the params that require grad now) and torch.compile around the raw model."""
    model = raw_model
    if dist.distributed:
        device = dist.device
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.model.compile:
        model = torch.compile(model)
    return model


def clean_train_loader(cfg: Config, device, dist: DistInfo, dtype, classes):
    """The training images through the validation transform (no augmentation), for the
    `clean` fit diagnosis; every image counted once across ranks."""
    return build_loader(cfg, "val", device, rank=dist.rank, world_size=dist.world_size, dtype=dtype,
                        classes=classes, path=dataset_paths(cfg)[0])


def diagnose_fit(source: str, stats: dict, val: dict, eval_model, clean_loader, autocast,
                 cfg: Config, dist: DistInfo):
    """TRICKS.md §8 (fastcls/diagnose.py): the verdict from this epoch's running train
    accuracy, or from a clean pass over the training images; None when off."""
    if source == "off":
        return None
    train_top1 = stats["train_top1"] if source == "running" else \
        evaluate(eval_model, clean_loader, autocast, dist)["val_top1"]
    return diagnose(train_top1, val["val_top1"], cfg, source)


def train_one_epoch(model, loader, optimizer, scaler, criterion, lr_at, step: int, epoch: int,
                    autocast, cfg: Config, dist: DistInfo, log: RunLog, augmenter=None, *,
                    start_step: int = 0,
                    stop: Optional[Preemption] = None, guard: Optional[LossGuard] = None,
                    last_ckpt: Optional[list] = None, save=None,
                    carry: Optional[list] = None) -> tuple[dict, int]:
    """Steps start_step..len(loader)-1 of `epoch` (the loader was set to start there).
    Returns (stats, global step); stats["epoch_steps"] < len(loader) when `stop` agreed
    on a preemption signal, stats["epoch_sums"] = [loss sum, correct, images] over all ranks.
    `save(epoch_step, step, epoch_sums)` is called every train.checkpoint_every steps (all
    ranks); `guard` stops the run on a NaN/inf loss. `carry` = epoch_sums of the steps before
    start_step (a resumed epoch), so the epoch's train_loss/train_top1 cover all its steps."""
    model.train()
    device = dist.device
    # Running sums stay on the device: reading them is a sync, done every log_every steps.
    # [loss * n, correct, images]; a resumed epoch's earlier totals count once, on rank 0.
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    if carry is not None and dist.is_main:
        sums += sums.new_tensor(carry)
    images_seen, wait, t_epoch = 0, 0.0, time.perf_counter()
    win_images, win_wait, t_win = 0, 0.0, t_epoch
    bar = log.bar(len(loader), f"epoch {epoch + 1}/{cfg.train.epochs}")
    bar.update(start_step)
    it = iter(loader)
    done = len(loader)
    for i in range(start_step, len(loader)):
        t0 = time.perf_counter()
        images, labels = next(it)
        dt = time.perf_counter() - t0
        wait, win_wait = wait + dt, win_wait + dt
        # On-device augmentation; targets are soft (N, C) while mixup/cutmix is on.
        images, targets = augmenter(images, labels, epoch, step) if augmenter else (images, labels)
        if not cfg.model.channels_last:
            images = images.contiguous()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if guard is not None:
            guard.observe(loss, step)
        n = labels.shape[0]
        sums[0] += loss.detach().double() * n
        sums[1] += (logits.detach().argmax(1) == dominant_label(targets)).sum()  # mixed: larger share
        sums[2] += n
        step += 1
        images_seen += n
        win_images += n
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == len(loader):
            loss_now = loss.item()  # sync, once per log_every steps
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{lr:.3g}",
                            img_s=f"{win_images * dist.world_size / (now - t_win):.0f}",
                            stall=f"{100 * win_wait / (now - t_win):.0f}%", refresh=False)
            win_images, win_wait, t_win = 0, 0.0, now
            if guard is not None:
                guard.check(lr_at, last_ckpt[0] if last_ckpt else None)
        bar.update(1)
        every = cfg.train.checkpoint_every
        if save is not None and every and (i + 1) % every == 0 and i + 1 < len(loader):
            save(i + 1, step, all_reduce_sum(sums.clone()).tolist())
        if stop is not None and i + 1 < len(loader) and stop.agreed(i):
            done = i + 1
            break
    bar.close()
    totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([len(loader.bad_files)])]))
    loss_sum, correct, count, bad = totals.tolist()
    elapsed = time.perf_counter() - t_epoch
    if bad:  # counted over all ranks; names from rank 0 (which alone logs)
        log.warn(f"epoch {epoch + 1}: {int(bad)} undecodable files skipped (replaced by other "
                 f"samples) on {dist.world_size} rank(s); rank 0's: {loader.bad_files[:5]}")
    return {"train_loss": loss_sum / max(count, 1), "train_top1": 100.0 * correct / max(count, 1),
            "img_per_s": images_seen * dist.world_size / elapsed,
            "data_stall": 100.0 * wait / elapsed, "epoch_steps": done,
            "epoch_sums": [loss_sum, correct, count]}, step


@torch.no_grad()
def evaluate(model, loader, autocast, dist: DistInfo) -> dict:
    """Top-1/top-5 and loss over the whole val set; each image counted once across ranks."""
    model.eval()
    sums = torch.zeros(4, device=dist.device, dtype=torch.float64)  # loss, top1, top5, n
    for images, labels in loader:
        if images.shape[0] == 0:  # every image of this batch failed to decode
            continue
        with autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        sums[0] += loss.double()
        sums[1:3] += topk_correct(logits, labels, (1, 5)).double()
        sums[3] += labels.shape[0]
    all_reduce_sum(sums)
    loss_sum, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n,
            "val_images": int(n)}


if __name__ == "__main__":
    sys.exit(main())
