"""Preemption: SIGUSR1/SIGTERM -> finish the step, checkpoint, exit so SLURM requeues.

    with Preemption(dist, check_every=cfg.train.log_every) as stop:  # installs the handlers
        ... after each optimizer step:  if stop.agreed(i): break
    # the previous handlers are back

The handler only sets a flag: nothing else is safe inside a signal handler and the step in
flight must finish. Ranks get the signal at different moments (SLURM signals every
process; a rank may be a step ahead), so all ranks must stop after the *same* step:
in one process the flag is read after every step (a Python bool, no device sync); with
several processes it is all-reduced (MAX) every `check_every` steps, one small collective
that is also a host<->device sync. Latency from the signal to the stop is therefore up to
`check_every` steps (train.log_every) plus the step in flight: keep it well under the
grace time (`--signal=USR1@120`: 120 s; SLURM's SIGTERM->SIGKILL KillWait: 30 s default).

After the checkpoint, rank 0 asks SLURM to requeue the job (`scontrol requeue $SLURM_JOB_ID`
when train.slurm_requeue and the run is a SLURM job) and the process exits with
EXIT_PREEMPTED; the requeued job starts with train.resume=auto and continues.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Callable, Optional

import torch
import torch.distributed as tdist

from .dist import DistInfo

EXIT_PREEMPTED = 3   # "checkpoint written, run me again with train.resume=auto"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; main() exits EXIT_PREEMPTED."""


class Preemption:
    def __init__(self, dist: DistInfo, check_every: int, signals=SIGNALS):
        self.dist, self.check_every = dist, max(1, check_every)
        self.requested: Optional[str] = None     # name of the first signal received
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. an embedding app): no handlers
                break

    def _handler(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def agreed(self, i: int) -> bool:
        """True on every rank after the same step once any rank got a signal.
        `i` = index of the step just done within the epoch (the same on all ranks)."""
        if not self.dist.distributed:
            return self.requested is not None
        if (i + 1) % self.check_every:
            return False
        flag = torch.tensor([self.requested is not None], dtype=torch.int32, device=self.dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())  # sync, once per check_every steps

    def agreed_now(self) -> bool:
        """Like agreed(), checked now whatever the cadence (at epoch ends)."""
        if not self.dist.distributed:
            return self.requested is not None
        return self.agreed(self.check_every - 1)

    def close(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def __enter__(self) -> "Preemption":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slurm_requeue(warn: Callable[[str], None]) -> bool:
    """`scontrol requeue` this SLURM job (rank 0 only, after the checkpoint is on disk).
    The job must have been submitted with --requeue (cluster/fastcls.sbatch does)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    if shutil.which("scontrol") is None:
        warn("SLURM job but no scontrol on PATH: not requeued; resubmit with train.resume=auto")
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        warn(f"scontrol requeue {job} failed: {proc.stderr.strip()}; resubmit with train.resume=auto")
        return False
    return True
