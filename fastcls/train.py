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
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import finetune
from .atomic import WriteError
from .augment import build_augmenter, dominant_label
from .config import Config, ConfigError, Resolved, load_config, resolve, to_dict
from .data import DatasetError, build_loader, closing_loaders, dataset_paths, split_size
from .data.base import train_image_size, val_image_size
from .diagnose import QUIET_KEYS, SIGMAS, FitTracker, early_reason, read_fit, train_acc_source
from .dist import DistInfo, all_reduce_sum, barrier, cleanup_distributed, setup_distributed, world_size_from_env
from .ema import ModelEma
from .guard import LossGuard, NonFiniteLoss
from .log import RunLog
from .loss import SmoothedCrossEntropy
from .metrics import ranked_classes, top1_class, topk_correct
from .models import build_model
from .optim import build_optimizer
from .preempt import EXIT_PREEMPTED, Preempted, Preemption
from .resume import ResumePoint, restore_rng_states, resume_point
from .schedule import build_schedule

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def image_size_schedule(data, epochs: int) -> dict[str, int]:
    """{"epochs 1-71": 160, "epochs 72-88": 192}: the training size per run of epochs,
    numbered from 1 as the progress bar and metrics.jsonl number them (--print-config)."""
    out: dict[str, int] = {}
    first = 0
    for e in range(1, epochs + 1):
        if e == epochs or train_image_size(data, e) != train_image_size(data, first):
            key = f"epochs {first + 1}-{e}" if e > first + 1 else f"epoch {e}"
            out[key] = train_image_size(data, first)
            first = e
    return out


def amp_setup(amp: str, device: torch.device) -> tuple[Callable, torch.dtype]:
    """(autocast factory, loader dtype) for train.amp on `device`: autocast in the AMP dtype
    (a no-op context when off); the loaders hand over that dtype on GPU (it halves the bytes
    moved), fp32 on the CPU."""
    dtype = AMP_DTYPES[amp]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    return autocast, dtype if (dtype is not None and device.type == "cuda") else torch.float32


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
        return split_size(cfg, "train"), ""
    except DatasetError as e:
        return None, str(e)


def resolved_tree(cfg: Config, res: Resolved) -> dict:
    tree = to_dict(cfg)
    tree["resolved"] = res.as_dict(cfg)
    if cfg.data.progressive.start_size:  # {"1-66": 160, "67-88": 192}: epochs as the log counts them
        tree["resolved"]["train_image_size"] = image_size_schedule(cfg.data, cfg.train.epochs)
    return tree


def print_config(cfg: Config, world_size: int, notes: Sequence[str] = ()) -> int:
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    n, note = count_train_images(cfg)
    res = resolve(cfg, world_size, n)
    sys.stdout.write(yaml.safe_dump(resolved_tree(cfg, res), sort_keys=False))
    if note:
        print(f"# steps_per_epoch unknown: {note}")
    warning = finetune.lr_warning(cfg, n)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir or f"runs/{cfg.name}")


def continue_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: its arguments with train.resume=auto."""
    args = [a for a in argv if not a.startswith("train.resume=")] + ["train.resume=auto"]
    launch = "torchrun ... -m fastcls.train" if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else "python -m fastcls.train"
    return f"{launch} {shlex.join(args)}"


def write_error_line(e: WriteError, cfg: Config, argv: Sequence[str]) -> str:
    """One line for a write that failed: the file, the bytes needed and free, the newest
    intact checkpoint and the command that continues from it."""
    path, state = ckpt.newest_intact(run_dir(cfg))
    where = f"newest intact checkpoint {path} ({ckpt.position(state)})" if path else \
        "no checkpoint written yet"
    return f"{e}; {where}; free space, then continue with: {continue_command(argv)}"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    notes: list[str] = []
    try:
        cfg = load_config(args.config, args.overrides, notes)
        if args.print_config:
            return print_config(cfg, args.world_size or world_size_from_env(), notes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = setup_distributed(cfg.train.device)
    try:
        # The loaders' workers stop when the run ends, however it ends: left to the garbage
        # collector or to exit-time terminate(), each outlives the run by 30 s (a worker must
        # survive SLURM's SIGTERM: data/workers.py worker_init; data/base.shutdown_workers).
        with closing_loaders():
            train(cfg, dist, notes)
        return 0
    except WriteError as e:  # a full disk or quota (rank 0 writes): what to do, no traceback
        print(f"error (rank {dist.rank}): {write_error_line(e, cfg, argv)}", file=sys.stderr)
        return 1
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
        cleanup_distributed()


# ============================================================================ the run

def train(cfg: Config, dist: DistInfo, notes: Sequence[str] = ()) -> dict:
    """Run the recipe; returns the last metrics record. `notes`: lines from load_config."""
    # ------------------------------------------------------------------ setup
    device = dist.device
    out_dir = run_dir(cfg)
    log = RunLog(out_dir, enabled=dist.is_main, progress=cfg.train.progress,
                 tensorboard=cfg.train.tensorboard)
    for note in notes:
        log.info(note)
    autocast, data_dtype = amp_setup(cfg.train.amp, device)
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP broadcasts anyway)
    set_determinism(cfg.train.deterministic)

    # ------------------------------------------------------------------ data
    train_loader, val_loader, res = build_data(cfg, dist, log, data_dtype)
    classes = list(train_loader.classes)

    # ------------------------------------------------------------------ model, optimizer, loss
    raw_model = build_run_model(cfg, dist, log, res.train_images)
    e = cfg.train.ema  # EMA of the unwrapped model's weights (fastcls/ema.py), before a resume loads it
    ema = ModelEma(raw_model, e.decay, e.every, e.warmup) if e.decay > 0 else None
    optimizer = build_optimizer(cfg.optim, raw_model, res.lr)
    lr_at = build_schedule(cfg.schedule, res.lr, res.steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    criterion = SmoothedCrossEntropy(cfg.model.num_classes, cfg.augment.label_smoothing)
    augmenter = build_augmenter(cfg.augment, cfg.model.num_classes, seed=cfg.train.seed, rank=dist.rank)
    if augmenter.names:
        log.info(f"augment on {device}: {' -> '.join(augmenter.names)}")

    # ------------------------------------------------------------------ resume
    ckpts = ckpt.Checkpointer(out_dir, model=raw_model, optimizer=optimizer, scaler=scaler,
                              classes=classes, config=to_dict(cfg), global_batch=res.global_batch_size,
                              keep=cfg.train.keep_checkpoints, dist=dist, log=log,
                              slurm_requeue=cfg.train.slurm_requeue, ema=ema)
    pos = resume(cfg, dist, log, ckpts, res, lr_at)
    step = pos.step

    # ------------------------------------------------------------------ wrap
    # Frozen before the DDP wrap: DDP then leaves the frozen params out of its reducer.
    frozen = pos.epoch < cfg.model.freeze_epochs and \
        finetune.set_backbone_frozen(raw_model, cfg.model.num_classes, True) > 0
    eval_model = torch.compile(raw_model) if cfg.model.compile else raw_model
    eval_pad = res.batch_size if cfg.model.compile else None  # one shape for the compiled graph
    ema_eval = None if ema is None else torch.compile(ema.module) if cfg.model.compile else ema.module
    fit_source = train_acc_source(cfg)
    clean_loader = clean_train_loader(cfg, dist, data_dtype, classes) if fit_source == "clean" else None
    # the verdict's hysteresis goes on over a resume: the evaluations before it, from metrics.jsonl
    fit_tracker = FitTracker.from_rows(cfg, log.read_metrics() if dist.is_main else [], pos.epoch)
    ctx = EpochContext(wrap_for_training(raw_model, cfg, dist), optimizer, scaler, criterion, lr_at,
                       autocast, augmenter, cfg, dist, log,
                       guard=LossGuard(device, scaler_skips=scaler is not None), ckpts=ckpts, ema=ema)

    # ------------------------------------------------------------------ loop
    record: dict = {}
    # `log` closes its TensorBoard writer on the way out; Preemption installs SIGUSR1/SIGTERM handlers
    with log, Preemption(dist, check_every=cfg.train.log_every) as stop:
        ctx.stop = stop
        for epoch in range(pos.epoch, cfg.train.epochs):
            if frozen and epoch >= cfg.model.freeze_epochs:
                finetune.set_backbone_frozen(raw_model, cfg.model.num_classes, False)
                finetune.fill_momentum_buffers(optimizer)
                ctx.model, frozen = wrap_for_training(raw_model, cfg, dist), False  # DDP sees all params
                log.info(f"epoch {epoch + 1}: backbone unfrozen (model.freeze_epochs={cfg.model.freeze_epochs})")
            first = pos.epoch_step if epoch == pos.epoch else 0
            size = train_image_size(cfg.data, epoch)  # set_epoch applies it (data.progressive)
            if cfg.data.progressive.start_size and (epoch == pos.epoch or
                                                    size != train_image_size(cfg.data, epoch - 1)):
                log.info(f"epoch {epoch + 1}: training images {size} px (data.progressive)")
            train_loader.set_epoch(epoch, first * cfg.train.accum_steps)  # in micro-batches
            stats, step = train_one_epoch(ctx, train_loader, epoch, step, start_step=first,
                                          carry=pos.epoch_sums if epoch == pos.epoch else None)
            done, sums = stats.pop("epoch_steps"), stats.pop("epoch_sums")
            if done < res.steps_per_epoch:
                raise ckpts.preempted(stop.requested, epoch, done, step, sums)
            val, is_best, is_best_ema = None, False, False
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                val, is_best, is_best_ema = evaluate_run(eval_model, ema_eval, val_loader, autocast,
                                                         cfg, dist, ckpts, eval_pad)
            ckpts.save(epoch + 1, 0, step, is_best=is_best,  # every epoch (+ train.checkpoint_every)
                       is_best_ema=is_best_ema)
            if val is not None:
                record = {"epoch": epoch + 1, "image_size": size, **stats, **val,
                          "lr": lr_at(max(step - 1, 0))}
                early = early_reason(cfg, epoch, step, res.steps_per_epoch, record["lr"], res.lr)
                fit = diagnose_fit(fit_source, fit_tracker, epoch, (stats["train_top1"], int(sums[2])),
                                   size, val, early, eval_model, clean_loader, autocast, cfg, dist,
                                   eval_pad)
                record.update(fit.as_record() if fit is not None else {})
                log.metrics(record, quiet=QUIET_KEYS)
                if fit is not None:
                    log.info(fit.line)
            if epoch + 1 < cfg.train.epochs and stop.agreed_now():  # signal during evaluation
                raise ckpts.preempted(stop.requested, epoch + 1, 0, step)
    curves = log.plot()
    fit_final = ""
    if "fit_final" in record:  # the last evaluation's verdict and the gap's trend
        fit_final = (f" | fit: {record['fit_final']} (gap {record['fit_gap']:+.2f} +/- "
                     f"{SIGMAS * record['fit_se']:.2f}, trend {record['fit_trend_direction']})")
    log.info(f"done: best val top-1 {ckpts.best_top1:.2f}%"
             + (f" (EMA {ckpts.best_ema_top1:.2f}%)" if ema is not None else "") + fit_final
             + f" | run folder {out_dir}" + (f" | curves {curves}" if curves else ""))
    # Ranks leave together: a gloo rank tearing the group down while rank 0 still plots or
    # writes was seen aborting ("terminate called without an active exception").
    barrier()
    return record


def set_determinism(deterministic: bool) -> None:
    """cuDNN autotuning (the fastest convolution algorithms per input shape, found in the
    first steps) unless `train.deterministic` asks for bitwise-reproducible kernels."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:  # (slower on GPU)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # Deterministic mode would also fill every new tensor with NaN: a fill queued on the
        # side stream races nvJPEG writing the same (decoder output) buffers.
        torch.utils.deterministic.fill_uninitialized_memory = False


def data_name(cfg: Config) -> str:
    """What the run trains on, for the header line: the train path (folder, list file, shards
    or .beton), "the built-in demo data" or "synthetic data"."""
    if cfg.data.backend == "synthetic":
        return "synthetic data"
    if cfg.data.demo:
        return f"the built-in demo data ({dataset_paths(cfg)[0]})"
    return cfg.data.train


def build_data(cfg: Config, dist: DistInfo, log: RunLog, dtype: torch.dtype):
    """(train loader, val loader, Resolved): the loaders of this rank, the data checks and
    the resolved config written into the run folder."""
    train_loader = build_loader(cfg, "train", dist.device, rank=dist.rank, world_size=dist.world_size,
                                dtype=dtype)
    val_loader = build_loader(cfg, "val", dist.device, rank=dist.rank, world_size=dist.world_size,
                              dtype=dtype, classes=train_loader.classes)
    n_cls = len(train_loader.classes)
    if n_cls > cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.train has "
                          f"{n_cls} classes; set model.num_classes={n_cls}")
    if n_cls < cfg.model.num_classes and cfg.data.backend != "synthetic":
        log.warn(f"model.num_classes={cfg.model.num_classes} > {n_cls} classes in data.train")
    for loader, split in ((train_loader, "train"), (val_loader, "val")):
        if loader.excluded:
            log.info(f"data.exclude: skipped {loader.excluded} listed files in data.{split}")
    for name in train_loader.empty_classes:
        log.warn(f"class folder {name!r} has no images")
    res = resolve(cfg, dist.world_size, train_loader.dataset_size)
    # the loader yields micro-batches; an optimizer step takes accum_steps of them
    assert res.steps_per_epoch == len(train_loader) // res.accum_steps, \
        (res.steps_per_epoch, len(train_loader), res.accum_steps)
    log.write_config(resolved_tree(cfg, res))
    log.info(f"fastcls: {cfg.name} on {dist.device} x{dist.world_size} | data: {data_name(cfg)} | "
             f"{res.train_images} train images, {n_cls} classes | global batch {res.global_batch_size} ({res.batch_size}/process"
             + (f" x {res.accum_steps} accumulation steps" if res.accum_steps > 1 else "") + ") "
             f"| lr {res.lr:.4g} | {res.steps_per_epoch} steps/epoch | out {log.out_dir}")
    return train_loader, val_loader, res


def build_run_model(cfg: Config, dist: DistInfo, log: RunLog, train_images: Optional[int]):
    """The model on the device (channels_last per the config), pretrained weights loaded
    (fine-tuning; a resume overrides them); then the per-rank RNG stream is seeded."""
    try:
        model = build_model(cfg.model.name, cfg.model.num_classes, blurpool=cfg.model.blurpool,
                            zero_init_residual=cfg.model.zero_init_residual)
    except ValueError as e:  # an option the model has nothing to apply to
        raise ConfigError(str(e)) from None
    if cfg.model.pretrained:
        log.info(str(finetune.load_pretrained(model, cfg.model.pretrained, cfg.model.num_classes)))
        warning = finetune.lr_warning(cfg, train_images)
        if warning:
            log.warn(warning)
    elif cfg.model.freeze_epochs:
        log.warn(f"model.freeze_epochs={cfg.model.freeze_epochs} without model.pretrained: "
                 f"the frozen backbone is randomly initialized")
    model = model.to(dist.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.train.seed + dist.rank)  # per-rank stream for dropout etc.
    return model


def resume(cfg: Config, dist: DistInfo, log: RunLog, ckpts: ckpt.Checkpointer, res: Resolved,
           lr_at) -> ResumePoint:
    """Load train.resume's checkpoint (if any) into the checkpointer's model, optimizer and
    scaler, put back this rank's RNG states, and return where to continue."""
    path, state = ckpt.load_resume(cfg.train.resume, ckpts.out_dir, warn=log.warn)
    pos = resume_point(state, res.global_batch_size, res.steps_per_epoch, path)
    if state is None:
        return pos
    if not ckpt.restore_state(state, path, ckpts.model, ckpts.optimizer, ckpts.scaler, ckpts.classes,
                              ema=ckpts.ema):
        log.warn(f"{path} has no EMA weights (train.ema was off): the EMA starts from its weights")
    ckpts.last, ckpts.best_top1 = str(path), pos.best_top1
    ckpts.best_ema_top1 = state.get("best_ema_top1", -1.0)
    if pos.remapped_from is not None:
        log.warn(f"checkpoint was written at global batch {pos.remapped_from}, now "
                 f"{res.global_batch_size}: continuing at step {pos.epoch_step} of the epoch "
                 f"(not bitwise what an uninterrupted run would do)")
    if pos.epoch >= cfg.model.freeze_epochs > 0:  # saved while frozen: classifier-only state
        finetune.fill_momentum_buffers(ckpts.optimizer)
    if not restore_rng_states(state.get("rng"), dist):
        log.warn("checkpoint has no RNG states for this number of processes: fresh RNG streams")
    log.info(f"resumed from {path}: epoch {pos.epoch + 1}, step {pos.epoch_step} of it, "
             f"global step {pos.step}, lr {lr_at(pos.step):.4g}")
    return pos


def wrap_for_training(raw_model, cfg: Config, dist: DistInfo):
    """DDP (over the params that require grad now) and torch.compile around the raw model."""
    model = raw_model
    if dist.distributed:
        device = dist.device
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no copy, less memory)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    if cfg.model.compile:
        model = torch.compile(model)
    return model


def evaluate_run(eval_model, ema_eval, loader, autocast, cfg: Config, dist: DistInfo,
                 ckpts: ckpt.Checkpointer, pad_to: Optional[int] = None) -> tuple[dict, bool, bool]:
    """The epoch's evaluation (train.eval_tta) of the model and, with train.ema, of its EMA
    (`val_*_ema` keys); the checkpointer's best top-1s follow. -> (metrics, new best model,
    new best EMA)."""
    val = evaluate(eval_model, loader, autocast, dist, pad_to, tta=cfg.train.eval_tta)
    is_best, is_best_ema = val["val_top1"] > ckpts.best_top1, False
    ckpts.best_top1 = max(ckpts.best_top1, val["val_top1"])
    if ema_eval is not None:
        ema = evaluate(ema_eval, loader, autocast, dist, pad_to, tta=cfg.train.eval_tta)
        val.update({f"{k}_ema": ema[k] for k in ("val_loss", "val_top1", "val_top5")})
        is_best_ema = val["val_top1_ema"] > ckpts.best_ema_top1
        ckpts.best_ema_top1 = max(ckpts.best_ema_top1, val["val_top1_ema"])
    return val, is_best, is_best_ema


def clean_train_loader(cfg: Config, dist: DistInfo, dtype, classes):
    """The training images through the validation transform (no augmentation), for the
    `clean` fit diagnosis; every image counted once across ranks."""
    return build_loader(cfg, "val", dist.device, rank=dist.rank, world_size=dist.world_size,
                        dtype=dtype, classes=classes, path=dataset_paths(cfg)[0])


def diagnose_fit(source: str, tracker: FitTracker, epoch: int, running: tuple[float, int],
                 train_size: int, val: dict, early: Optional[str], eval_model, clean_loader, autocast,
                 cfg: Config, dist: DistInfo, pad_to: Optional[int] = None):
    """The guide §8 (fastcls/diagnose.py, docs/recipes.md) after the evaluation of `epoch`
    (from 0): the reading from the epoch's running train accuracy `running` = (top-1, images)
    or from a clean pass over the training images, and the tracker's verdict; None when off."""
    if source == "off":
        return None
    if source == "running":
        train_top1, n_train = running
    else:
        clean = evaluate(eval_model, clean_loader, autocast, dist, pad_to, tta=cfg.train.eval_tta)
        train_top1, n_train = clean["val_top1"], clean["val_images"]
    reading = read_fit(train_top1, n_train, val["val_top1"], val["val_images"], cfg, source,
                       train_size=train_size, val_size=val_image_size(cfg.data))
    return tracker.update(epoch + 1, reading, early, final=epoch + 1 == cfg.train.epochs,
                          ema_val_top1=val.get("val_top1_ema"))


@dataclass
class EpochContext:
    """What an epoch of training works with (built once by train(); `model` is the wrapped
    one, replaced when the backbone is unfrozen). `guard` stops the run on a NaN/inf loss,
    `stop` agrees on a preemption signal, `ckpts` writes the train.checkpoint_every
    checkpoints, `ema` averages the weights (train.ema); each may be None
    (benchmarks/train.py runs without them)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    criterion: torch.nn.Module
    lr_at: Callable[[int], float]
    autocast: Callable
    augmenter: Optional[Callable]
    cfg: Config
    dist: DistInfo
    log: RunLog
    guard: Optional[LossGuard] = None
    stop: Optional[Preemption] = None
    ckpts: Optional[ckpt.Checkpointer] = None
    ema: Optional[ModelEma] = None


def train_one_epoch(ctx: EpochContext, loader, epoch: int, step: int, *, start_step: int = 0,
                    carry: Optional[list] = None) -> tuple[dict, int]:
    """Optimizer steps start_step..S-1 of `epoch`, S = len(loader) // train.accum_steps (the
    loader yields micro-batches and was set to start at micro-batch start_step x accum_steps).
    Each optimizer step accumulates the gradients of accum_steps micro-batches, then clips
    them (optim.clip_grad_norm) and steps. Returns (stats, global step); stats["epoch_steps"]
    (optimizer steps) < S when `ctx.stop` agreed on a preemption signal,
    stats["epoch_sums"] = [loss sum, correct, images] over all ranks. `carry` = epoch_sums of
    the steps before start_step (a resumed epoch), so the epoch's train_loss/train_top1
    cover all its steps."""
    model, optimizer, scaler, cfg, dist = ctx.model, ctx.optimizer, ctx.scaler, ctx.cfg, ctx.dist
    accum, clip = cfg.train.accum_steps, cfg.optim.clip_grad_norm
    steps = len(loader) // accum
    model.train()
    # Running sums stay on the device: reading them is a sync, done every log_every steps.
    # [loss * n, correct, images]; a resumed epoch's earlier totals count once, on rank 0.
    sums = torch.zeros(3, device=dist.device, dtype=torch.float64)
    if carry is not None and dist.is_main:
        sums += sums.new_tensor(carry)
    images_seen, wait, t_epoch = 0, 0.0, time.perf_counter()
    win_images, win_wait, t_win = 0, 0.0, t_epoch
    bar = ctx.log.bar(steps, f"epoch {epoch + 1}/{cfg.train.epochs}")
    bar.update(start_step)
    it = iter(loader)
    done = steps
    for i in range(start_step, steps):
        lr = ctx.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            t0 = time.perf_counter()
            images, labels = next(it)
            dt = time.perf_counter() - t0
            wait, win_wait = wait + dt, win_wait + dt
            # On-device augmentation, seeded per micro-batch (= per step without accumulation);
            # targets are soft (N, C) while mixup/cutmix is on.
            images, targets = ctx.augmenter(images, labels, epoch, step * accum + micro) \
                if ctx.augmenter else (images, labels)
            if not cfg.model.channels_last:
                images = images.contiguous()
            # DDP all-reduces the gradients in the last micro-batch's backward only.
            with no_sync(model) if micro < accum - 1 else contextlib.nullcontext():
                with ctx.autocast():
                    logits = model(images)
                    loss = ctx.criterion(logits, targets)
                # mean over the accum_steps x batch images of the optimizer step
                part = loss / accum if accum > 1 else loss
                (scaler.scale(part) if scaler is not None else part).backward()
            if ctx.guard is not None:
                ctx.guard.observe(loss, step)
            n = labels.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += (top1_class(logits.detach()) == dominant_label(targets)).sum()  # mixed: larger share
            sums[2] += n
            images_seen += n
            win_images += n
        if clip > 0:
            if scaler is not None:  # clip the true gradients; an inf/nan step is still skipped
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # on the device: no sync
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ctx.ema is not None:  # after optimizer step number step + 1; foreach ops, no sync
            ctx.ema.step(step + 1)
        step += 1
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == steps:
            loss_now = loss.item()  # sync, once per log_every steps
            now = time.perf_counter()
            img_s, stall = win_images * dist.world_size / (now - t_win), 100 * win_wait / (now - t_win)
            bar.set_postfix(loss=f"{loss_now:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}",
                            stall=f"{stall:.0f}%", refresh=False)
            ctx.log.scalars(step, {"train/loss": loss_now, "train/lr": lr, "train/img_per_s": img_s,
                                   "train/data_stall": stall})  # host floats: no further sync
            win_images, win_wait, t_win = 0, 0.0, now
            if ctx.guard is not None:
                ctx.guard.check(ctx.lr_at, ctx.ckpts.last if ctx.ckpts else None)
        bar.update(1)
        every = cfg.train.checkpoint_every
        if ctx.ckpts is not None and every and (i + 1) % every == 0 and i + 1 < steps:
            ctx.ckpts.save(epoch, i + 1, step, epoch_sums=all_reduce_sum(sums.clone()).tolist())
        if ctx.stop is not None and i + 1 < steps and ctx.stop.agreed(i):
            done = i + 1
            break
    bar.close()
    if done == steps and len(loader) > steps * accum:  # the len(loader) % accum_steps
        for _ in it:                                     # micro-batches left: read, not trained on
            pass
    totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([len(loader.bad_files)])]))
    loss_sum, correct, count, bad = totals.tolist()
    elapsed = time.perf_counter() - t_epoch
    if bad:  # counted over all ranks; names from rank 0 (which alone logs)
        ctx.log.warn(f"epoch {epoch + 1}: {int(bad)} undecodable files skipped (replaced by other "
                     f"samples) on {dist.world_size} rank(s); rank 0's: {loader.bad_files[:5]}")
    for line in loader.epoch_warnings():  # rank 0's, once per epoch
        ctx.log.warn(f"epoch {epoch + 1}: {line}")
    return {"train_loss": loss_sum / max(count, 1), "train_top1": 100.0 * correct / max(count, 1),
            "img_per_s": images_seen * dist.world_size / elapsed,
            "data_stall": 100.0 * wait / elapsed, "epoch_steps": done,
            "epoch_sums": [loss_sum, correct, count]}, step


def no_sync(model):
    """DDP's `no_sync()` (no gradient all-reduce in this backward) for a DDP model, also
    inside torch.compile; a no-op context for a model of one process."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if isinstance(inner, DDP) else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, loader, autocast, dist: DistInfo, pad_to: Optional[int] = None, *,
             tta: str = "none", confusion_classes: int = 0) -> dict:
    """Top-1/top-5 and loss over the whole val set; each image counted once across ranks.
    `pad_to` (a compiled model): smaller batches (the last one) are padded to this size with
    zeros and the padding's logits dropped, so the compiled graph sees one shape and does not
    recompile (BatchNorm in eval mode treats every image alone: the padding changes nothing).
    `tta="flip"` (train.eval_tta): the logits are the mean of the image's and its mirror's
    (ffcv-imagenet sums them: the same ranking, a loss on the mean).
    With `confusion_classes` = C > 0 also "confusion": the int64 C×C confusion matrix on the
    CPU (row = true class, column = top-1 prediction; C = the model's outputs).
    Top-1, top-5 and the confusion matrix read one ranking per image
    (fastcls.metrics.ranked_classes: tied logits rank by class index, lowest first), so
    100 × trace(confusion) / images is val_top1 exactly."""
    if tta not in ("none", "flip"):
        raise ValueError(f"tta must be 'none' or 'flip', got {tta!r}")
    model.eval()
    sums = torch.zeros(4, device=dist.device, dtype=torch.float64)  # loss, top1, top5, n
    conf = torch.zeros(confusion_classes ** 2, device=dist.device, dtype=torch.int64)
    for images, labels in loader:
        n = images.shape[0]
        if n == 0:  # every image of this batch failed to decode
            continue
        if pad_to is not None and n < pad_to:
            pad = images.new_zeros((pad_to - n, *images.shape[1:]))
            images = torch.cat([images, pad]).contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
            if tta == "flip":  # mirror along W; flip keeps the channels_last layout
                logits = (logits.float() + model(images.flip(3)).float()) / 2
            logits = logits[:n]
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        sums[0] += loss.double()
        ranked = ranked_classes(logits, 5)  # one prediction per image for every count below
        sums[1:3] += topk_correct(logits, labels, (1, 5), ranked=ranked).double()
        sums[3] += labels.shape[0]
        if confusion_classes:
            conf += torch.bincount(labels * confusion_classes + ranked[:, 0],
                                   minlength=confusion_classes ** 2)
    all_reduce_sum(sums)
    loss_sum, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    out = {"val_loss": loss_sum / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n,
           "val_images": int(n)}
    if confusion_classes:
        out["confusion"] = all_reduce_sum(conf).view(confusion_classes, confusion_classes).cpu()
    return out


if __name__ == "__main__":
    sys.exit(main())
