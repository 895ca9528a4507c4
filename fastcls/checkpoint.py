"""Checkpoints: written atomically, verified on load, the last K kept.

A checkpoint is a dict: `model` (unwrapped state_dict), `optimizer`, `scaler` (or None),
`epoch` (the epoch to run next, or the one in progress when `epoch_step` > 0),
`epoch_step` (steps of that epoch already done: > 0 for a mid-epoch checkpoint),
`step` (global optimizer steps done = the schedule position), `classes`, `best_top1`,
`config` (the resolved config as a plain dict) and `rng` (one RNG-state dict per rank,
see fastcls.resume). With train.ema on: `ema` (the EMA model's state_dict, the same keys as
`model`), `ema_updates` (EMA updates done) and `best_ema_top1`. The loader's position is
(epoch, epoch_step): every backend replays an epoch's order from (seed, epoch) and seeks
with `set_epoch(epoch, start_step)`; the epoch also fixes its image size.

Files in the run folder: `last.pt` (newest), `last.1.pt` ... `last.{K-1}.pt` (older, K =
train.keep_checkpoints), `best.pt` (best val top-1), `best_ema.pt` (best EMA val top-1,
with train.ema); each with a `NAME.sha256` sidecar in `sha256sum` format. Loading checks
the digest and unpickles (plain types only); `train.resume=auto` takes the newest
checkpoint that passes and warns about each one that does not.

A new checkpoint is written whole (temp file and sidecar, fsynced) before anything is
rotated or replaced: a full disk or a quota stops the write with `WriteError` (the file,
the bytes needed and free) and leaves every existing checkpoint, `last.pt` included, as it
was; the temp files are removed.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .atomic import WriteError, os_error_in
from .dist import barrier
from .preempt import Preempted, slurm_requeue
from .resume import gather_rng_states


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt or not a fastcls checkpoint."""


class _HashingWriter:
    """File wrapper that hashes what torch.save writes (no second pass over the file) and
    counts the bytes."""

    def __init__(self, f):
        self.f, self.h, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in `obj` (dicts, lists, tuples): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj: dict, path: str | os.PathLike,
                before_replace: Optional[Callable[[], None]] = None) -> None:
    """Write `obj` to a temp file in the same folder and its SHA-256 to a temp sidecar, fsync
    both, then (after `before_replace()`, e.g. the rotation of older checkpoints) rename them
    over `path` and `path.sha256`: a crash at any point leaves either the old file or the
    new one, never a half-written one (a file without its sidecar is still loadable, verified
    by unpickling only). Nothing is renamed until both are on disk: a write that fails (a
    full disk, a quota) raises WriteError naming `path`, the bytes needed and free, with the
    temp files removed and the existing files untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    side_tmp = path.with_name(f"{Path(tmp).name}.sha256")
    w = None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                w = _HashingWriter(f)
                torch.save(obj, w)
                f.flush()
                os.fsync(f.fileno())
            _write_synced(side_tmp, f"{w.h.hexdigest()}  {path.name}\n".encode())
        except (OSError, RuntimeError) as e:  # torch wraps the OSError in a RuntimeError
            err = os_error_in(e)
            if err is None:
                raise
            _remove(tmp, side_tmp)  # before measuring what is free
            raise WriteError(path, err, max(tensor_bytes(obj), w.bytes if w else 0)) from None
        if before_replace is not None:
            before_replace()
        _sidecar(path).unlink(missing_ok=True)  # never pair the new file with the old digest
        os.replace(tmp, path)
        os.replace(side_tmp, _sidecar(path))
    except BaseException:
        _remove(tmp, side_tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def _remove(*paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def remove_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp files an interrupted save_atomic left in `out_dir` (a killed process
    cannot clean up; on a nearly full disk they hold the space the next checkpoint needs)."""
    gone = []
    for p in Path(out_dir).glob(".*.pt.*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def load(path: str | os.PathLike) -> dict:
    # weights_only: checkpoints hold tensors and plain Python types, nothing executable.
    return torch.load(path, map_location="cpu", weights_only=True)


REQUIRED_KEYS = ("model", "optimizer", "epoch", "step", "classes")


def verify_digest(path: str | os.PathLike) -> None:
    """CheckpointError when `path` has a `.sha256` sidecar whose digest it does not match."""
    path = Path(path)
    side = _sidecar(path)
    if side.is_file():
        want = side.read_text().split()[0] if side.read_text().strip() else ""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want:
            raise CheckpointError(f"{path}: SHA-256 differs from {side.name} (corrupt or truncated)")


def load_any(path: str | os.PathLike):
    """The digest-checked, unpickled contents of `path` (any torch.save file of tensors and
    plain types); CheckpointError names the file and what is wrong with it."""
    verify_digest(path)
    try:
        return load(path)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... for bad files
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def is_fastcls_state(state) -> bool:
    return isinstance(state, dict) and all(k in state for k in REQUIRED_KEYS)


def load_verified(path: str | os.PathLike) -> dict:
    """Load `path` after checking its `.sha256` sidecar (when present); CheckpointError
    names the file and what is wrong with it."""
    state = load_any(path)
    if not is_fastcls_state(state):
        raise CheckpointError(f"{path}: not a fastcls checkpoint (keys {REQUIRED_KEYS} expected)")
    return state


def rotated(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """last.pt, last.1.pt, ..., newest first: the files `keep` checkpoints occupy."""
    d = Path(out_dir)
    return [d / "last.pt"] + [d / f"last.{i}.pt" for i in range(1, keep)]


def candidates(out_dir: str | os.PathLike) -> list[Path]:
    """Existing last*.pt files of a run folder, newest first (whatever K wrote them)."""
    d = Path(out_dir)
    older = sorted((p for p in d.glob("last.*.pt") if p.stem.split(".")[1].isdigit()),
                   key=lambda p: int(p.stem.split(".")[1]))
    return [p for p in [d / "last.pt", *older] if p.is_file()]


def newest_intact(out_dir: str | os.PathLike, skipped: Callable[[CheckpointError], None] = lambda e: None
                  ) -> tuple[Optional[Path], Optional[dict]]:
    """(path, state) of the newest last*.pt in `out_dir` that verifies: what
    `train.resume=auto` continues from; (None, None) when there is none. `skipped` is told
    of each newer one that does not verify."""
    for p in candidates(out_dir):
        try:
            return p, load_verified(p)
        except CheckpointError as e:
            skipped(e)
    return None, None


def position(state: dict) -> str:
    """Where a checkpoint stands, as a user counts epochs: 'end of epoch 3' or 'epoch 4, step
    120 of it'."""
    epoch, step = int(state.get("epoch", 0)), int(state.get("epoch_step", 0) or 0)
    return f"epoch {epoch + 1}, step {step} of it" if step else f"end of epoch {epoch}"


def load_resume(resume: str, out_dir: str | os.PathLike,
                warn: Callable[[str], None] = print) -> tuple[Optional[Path], Optional[dict]]:
    """`train.resume` -> (path, state), or (None, None) for a fresh start.

    `""`: fresh. `auto`: the newest checkpoint in `out_dir` that verifies; each one that
    does not is named in a warning and skipped (fresh start when none is left). A PATH
    must exist and verify (an error otherwise: the user asked for that file)."""
    if not resume:
        return None, None
    if resume != "auto":
        p = Path(resume)
        if not p.is_file():
            raise FileNotFoundError(f"train.resume: checkpoint {resume!r} does not exist")
        return p, load_verified(p)
    return newest_intact(out_dir, lambda e: warn(f"skipping bad checkpoint: {e}; falling back to the previous one"))


def _rotate(out_dir: Path, keep: int) -> None:
    """Shift last.pt -> last.1.pt -> ... -> last.{keep-1}.pt (the oldest drops off).
    Each rename is atomic; a crash midway leaves every file whole (resume=auto scans).
    last.pt itself is hard-linked, not moved: it stays in place until the new one replaces
    it (on a filesystem without hard links it is moved)."""
    files = rotated(out_dir, keep)
    for src, dst in zip(reversed(files[:-1]), reversed(files[1:])):
        for a, b in ((src, dst), (_sidecar(src), _sidecar(dst))):
            if not a.is_file():
                b.unlink(missing_ok=True)
            elif a == files[0] or a == _sidecar(files[0]):
                b.unlink(missing_ok=True)
                try:
                    os.link(a, b)
                except OSError:
                    os.replace(a, b)
            else:
                os.replace(a, b)


def save_checkpoint(out_dir: str | os.PathLike, state: dict, *, keep: int = 1,
                    is_best: bool = False, is_best_ema: bool = False) -> Path:
    """Write `state` as out_dir/last.pt (older ones rotated once it is written whole, `keep`
    in all), best.pt and best_ema.pt. WriteError when a file cannot be written: the ones
    written before it stay (last.pt first, then best.pt)."""
    out_dir = Path(out_dir)
    path = out_dir / "last.pt"
    save_atomic(state, path, before_replace=(lambda: _rotate(out_dir, keep)) if keep > 1 else None)
    if is_best:
        save_atomic(state, out_dir / "best.pt")
    if is_best_ema:
        save_atomic(state, out_dir / "best_ema.pt")
    return path


def make_state(model: nn.Module, optimizer, scaler, *, epoch: int, step: int,
               classes: Sequence[str], best_top1: float, config: dict, epoch_step: int = 0,
               rng: Optional[list] = None, ema=None, best_ema_top1: float = -1.0) -> dict:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": epoch, "epoch_step": epoch_step, "step": step, "classes": list(classes),
             "best_top1": best_top1, "config": config, "rng": rng}
    if ema is not None:  # fastcls.ema.ModelEma
        state.update(ema=ema.state_dict(), ema_updates=ema.updates, best_ema_top1=best_ema_top1)
    return state


def restore_state(state: dict, path, model: nn.Module, optimizer, scaler,
                  classes: Sequence[str], ema=None) -> bool:
    """Load a verified checkpoint dict into model/optimizer/scaler and, when given, the EMA
    (fastcls.ema.ModelEma). Returns False when an EMA was given but the checkpoint has none:
    the EMA then starts from the loaded weights."""
    if state["classes"] != list(classes):
        raise CheckpointError(f"train.resume: {path} was trained on other classes "
                           f"({len(state['classes'])}) than data.train ({len(classes)})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is None:
        return True
    if state.get("ema") is None:
        ema.load(model.state_dict(), 0)  # its first update copies the model (decay 0)
        return False
    ema.load(state["ema"], int(state["ema_updates"]))
    return True


class Checkpointer:
    """The run's checkpoints: `save` (every rank calls it: the RNG gather is a collective;
    rank 0 writes), the newest path (`last`, named by the NaN guard and the preemption
    message) and the preemption checkpoint + requeue (`preempted`). `best_top1` is the best
    val top-1 so far, stored in every checkpoint."""

    def __init__(self, out_dir: Path, *, model: nn.Module, optimizer, scaler, classes: Sequence[str],
                 config: dict, global_batch: int, keep: int, dist, log, slurm_requeue: bool,
                 last: Optional[str] = None, best_top1: float = -1.0, ema=None):
        self.out_dir, self.model, self.optimizer, self.scaler = out_dir, model, optimizer, scaler
        self.classes, self.config, self.global_batch, self.keep = list(classes), config, global_batch, keep
        self.dist, self.log, self.slurm_requeue = dist, log, slurm_requeue
        self.last, self.best_top1 = last, best_top1
        self.ema, self.best_ema_top1 = ema, -1.0  # fastcls.ema.ModelEma or None
        if dist.is_main:
            for p in remove_temp_files(out_dir):
                log.info(f"removed {p}: the temp file of a checkpoint write that did not finish")

    def save(self, epoch: int, epoch_step: int, step: int, *, is_best: bool = False,
             is_best_ema: bool = False, epoch_sums: Optional[list] = None) -> None:
        """Checkpoint (epoch, epoch_step, step). Mid-epoch, `epoch_sums` ([loss sum, correct,
        images] over all ranks so far) let the resumed run report the whole epoch's
        train_loss/train_top1. `global_batch` maps epoch_step to another world size.
        WriteError (rank 0) when the disk is full: the existing checkpoints stay as they were."""
        rng = gather_rng_states(self.dist)
        if not self.dist.is_main:
            return
        state = make_state(self.model, self.optimizer, self.scaler, epoch=epoch, epoch_step=epoch_step,
                           step=step, classes=self.classes, best_top1=self.best_top1,
                           config=self.config, rng=rng, ema=self.ema,
                           best_ema_top1=self.best_ema_top1)
        state["global_batch"] = self.global_batch
        if epoch_step:
            state["epoch_sums"] = epoch_sums
        self.last = str(save_checkpoint(self.out_dir, state, keep=self.keep, is_best=is_best,
                                        is_best_ema=is_best_ema))

    def preempted(self, signal_name: Optional[str], epoch: int, epoch_step: int, step: int,
                  epoch_sums: Optional[list] = None):
        """Write the preemption checkpoint, requeue the SLURM job (rank 0) and return the
        `Preempted` exception for the caller to raise (main() exits EXIT_PREEMPTED)."""
        self.save(epoch, epoch_step, step, epoch_sums=epoch_sums)
        barrier()  # the checkpoint is on disk before anyone is requeued or exits
        where = f"epoch {epoch + 1}, step {epoch_step} of it"
        requeued = self.dist.is_main and self.slurm_requeue and slurm_requeue(self.log.warn)
        self.log.warn(f"{signal_name or 'signal'} received: checkpoint at {where} in {self.last}; "
                      + ("SLURM job requeued" if requeued else "resume with train.resume=auto"))
        return Preempted(f"checkpoint at {where}")
