"""Process group from the torchrun environment (or SLURM's); rank helpers.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without them the
run is a single process and no process group is created. Launched by `srun` with one task
per GPU and no torchrun, the same variables are derived from SLURM's (`env_from_slurm`).
The GPU is LOCAL_RANK modulo the visible devices, so a per-task CUDA_VISIBLE_DEVICES
(`--gpus-per-task=1`: one device each) and a shared one (`--gpus-per-node=8`) both work.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """`auto` = this process's GPU when CUDA is available, else the CPU."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: `gpu[07-09,12],cpu3` -> `gpu07`.

    Written here rather than calling `scontrol show hostnames` so a process needs no SLURM
    client; only the first name is needed (the rendezvous host, as sbatch scripts use)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables for a process started by `srun` without torchrun.

    Empty when torchrun already set RANK or when this is not a multi-task `srun` step
    (SLURM_STEP_NUM_TASKS is set by srun only, not in the batch script itself, where one
    plain `python -m fastcls.train` must stay a single process). MASTER_PORT defaults to
    20000 + job id mod 20000 so that jobs sharing a node differ."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    ntasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if ntasks <= 1:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    job = int(environ.get("SLURM_JOB_ID", "0"))
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(ntasks),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job % 20000)}


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Create the process group (NCCL on GPU, gloo on CPU) when launched by torchrun (or
    by srun, one task per process: see env_from_slurm)."""
    os.environ.update(env_from_slurm(os.environ))
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = restart_scoped_store(os.environ, world)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        tdist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, local_rank, world, device)


# torchrun's c10d rendezvous hosts one TCPStore in the agent and hands it to the workers
# (TORCHELASTIC_USE_AGENT_STORE=True). Up to at least torch 2.14 that store lives as long as
# the agent and init_process_group puts no per-restart prefix on its keys, so after
# `--max-restarts` restarts the workers a restarted rank can read the gloo/NCCL address a
# dead rank of the previous attempt left there and fail with "Connection refused" (or wait on
# a reused port) -- pytorch/pytorch#135712. Workaround, written here because torch offers
# none from the worker side: scope the keys by TORCHELASTIC_RESTART_COUNT. That count is the
# same on every rank only when one agent started them all (one node); across nodes the agents
# count restarts separately, so there the agent must not share its store:
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (cluster/fastcls.sbatch sets it) -- warned below.
def restart_scoped_store(environ: Mapping[str, str], world: int) -> Optional["tdist.Store"]:
    """A store for init_process_group whose keys are private to this torchrun restart, or
    None to let torch create the usual one."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) <= 0:
        return None
    if int(environ.get("GROUP_WORLD_SIZE", "1") or 1) > 1:
        if environ.get("RANK") == "0":
            warnings.warn("torchrun --max-restarts over several nodes with the agent's shared "
                          "store: a restarted rank can read a dead rank's address "
                          "(pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                          "for torchrun (cluster/fastcls.sbatch does)", stacklevel=2)
        return None
    from torch.distributed.constants import default_pg_timeout
    client = tdist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world,
                            is_master=False, timeout=default_pg_timeout)
    return tdist.PrefixStore(f"fastcls/restart_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def cleanup_distributed() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a host<->device sync on GPU); no-op in one process."""
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()
