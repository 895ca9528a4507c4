"""Exact resume after SIGKILL mid-epoch, mid-epoch loader seek, verified and rotated
checkpoints with fallback, NaN/inf stop, preemption agreement across ranks, SLURM env."""
import json
import signal
import subprocess
import time

import pytest
import torch

from fastcls import checkpoint as ckpt
from fastcls.config import config_from_dict
from fastcls.data import build_loader
from fastcls.dist import env_from_slurm, first_host
from fastcls.train import main

from conftest import PY, ROOT, make_folder, run_env

CPU = torch.device("cpu")
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_args(data, out, *extra):
    return ["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
            "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
            "data.workers=0", "train.progress=false", f"train.out_dir={out}", "train.amp=off",
            "train.deterministic=true", "train.log_every=2", *extra]


# ---------------------------------------------------------------- loader seek

@pytest.mark.parametrize("workers", [0, 2])
def test_native_set_epoch_start_step_yields_tail_of_epoch(folder, workers):
    cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3},
                            "data": {"train": str(folder), "batch_size": 3, "image_size": 24,
                                     "workers": workers}})
    loader = build_loader(cfg, "train", CPU, rank=1, world_size=2)
    assert len(loader) == 3
    loader.set_epoch(5)
    full = list(loader)
    loader.set_epoch(5, start_step=2)
    tail = list(loader)
    assert len(tail) == 1 and len(loader) == 3  # len stays the full epoch
    assert torch.equal(tail[0][0], full[2][0]) and torch.equal(tail[0][1], full[2][1])
    assert len(list(loader)) == 3  # the seek applies to one iteration only
    with pytest.raises(ValueError, match="start_step 4 outside"):
        loader.set_epoch(5, start_step=4)


def test_synthetic_set_epoch_start_step():
    cfg = config_from_dict({"model": {"num_classes": 7}, "data": {"backend": "synthetic", "batch_size": 4,
                                                                  "image_size": 8, "synthetic_images": 40}})
    loader = build_loader(cfg, "train", CPU)
    loader.set_epoch(1, start_step=7)
    assert len(list(loader)) == 3 and len(loader) == 10 and len(list(loader)) == 10


# ---------------------------------------------------------------- checkpoints

def _state(i):
    return {"model": {"w": torch.full((3,), float(i))}, "optimizer": {}, "epoch": i, "step": i,
            "classes": ["a"]}


def test_checkpoints_rotate_keep_k_and_fall_back_when_corrupt(tmp_path):
    for i in range(5):
        ckpt.save_checkpoint(tmp_path, _state(i), keep=3)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.1.pt", "last.2.pt", "last.pt"]
    assert [ckpt.load_verified(p)["epoch"] for p in ckpt.candidates(tmp_path)] == [4, 3, 2]
    # sha256sum-compatible sidecars
    proc = subprocess.run(["sha256sum", "-c", "last.pt.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = []
    # a flipped byte in the newest: digest mismatch -> previous one, with a warning
    data = bytearray((tmp_path / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "last.pt").write_bytes(bytes(data))
    path, state = ckpt.load_resume("auto", tmp_path, warn=warnings.append)
    assert path.name == "last.1.pt" and state["epoch"] == 3
    assert "SHA-256 differs" in warnings[0] and "last.pt" in warnings[0]
    # truncated without a sidecar (crash between file and digest): caught by unpickling
    (tmp_path / "last.1.pt").write_bytes((tmp_path / "last.1.pt").read_bytes()[:100])
    (tmp_path / "last.1.pt.sha256").unlink()
    path, state = ckpt.load_resume("auto", tmp_path, warn=warnings.append)
    assert path.name == "last.2.pt" and state["epoch"] == 2 and "cannot be loaded" in warnings[-1]
    # an explicitly named corrupt file is an error, not a silent fallback
    with pytest.raises(ckpt.CheckpointError, match="last.pt: SHA-256 differs"):
        ckpt.load_resume(str(tmp_path / "last.pt"), tmp_path)
    # nothing usable left: a fresh start
    (tmp_path / "last.2.pt").write_bytes(b"")
    assert ckpt.load_resume("auto", tmp_path, warn=warnings.append) == (None, None)


def test_resume_point_from_a_checkpoint():
    from fastcls.config import ConfigError
    from fastcls.resume import ResumePoint, resume_point
    assert resume_point(None, 64, 10) == ResumePoint(0, 0, 0, -1.0, None, None)
    state = {"epoch": 2, "step": 23, "epoch_step": 3, "best_top1": 40.0, "global_batch": 64,
             "epoch_sums": [1.0, 2.0, 192.0]}
    same = resume_point(state, 64, 10)
    assert (same.epoch, same.epoch_step, same.step, same.best_top1) == (2, 3, 23, 40.0)
    assert same.epoch_sums == [1.0, 2.0, 192.0] and same.remapped_from is None
    # 2 processes -> 1 at the same per-process batch: 3 steps of 64 = 6 steps of 32 images
    half = resume_point(state, 32, 20)
    assert (half.epoch, half.epoch_step, half.step, half.remapped_from) == (2, 6, 2 * 20 + 6, 64)
    # an epoch boundary carries no epoch sums; an old checkpoint without global_batch is taken as is
    boundary = resume_point({"epoch": 1, "step": 10, "best_top1": 5.0}, 128, 10)
    assert (boundary.epoch, boundary.epoch_step, boundary.step, boundary.epoch_sums) == (1, 0, 10, None)
    with pytest.raises(ConfigError, match="stopped at step 3 of an epoch, but an epoch now has 3 steps"):
        resume_point(state, 64, 3, "x.pt")


def test_resume_against_other_classes_is_a_checkpoint_error(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.make_state(model, opt, None, epoch=1, step=1, classes=["a", "b"], best_top1=0.0, config={})
    with pytest.raises(ckpt.CheckpointError, match="trained on other classes"):
        ckpt.restore_state(state, tmp_path / "last.pt", model, opt, None, ["a", "c"])


def test_torch_save_through_hashing_writer_roundtrips(tmp_path):
    big = {"model": {"w": torch.randn(300, 300)}, "optimizer": {"x": [1, 2]}, "epoch": 1, "step": 2,
           "classes": ["a", "b"], "rng": [{"python": (3, tuple(range(625)), None)}]}
    ckpt.save_atomic(big, tmp_path / "x.pt")
    back = ckpt.load_verified(tmp_path / "x.pt")
    assert torch.equal(back["model"]["w"], big["model"]["w"]) and back["rng"] == big["rng"]
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left


# ---------------------------------------------------------------- exact resume after SIGKILL

def _train(args, env, **kw):
    return subprocess.run([PY, "-m", "fastcls.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.mark.parametrize("device, source", [
    ("cpu", "folder"), ("cpu", "shards"),
    pytest.param("cuda", "folder", marks=[pytest.mark.gpu, pytest.mark.slow])])
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path, device, source):
    """A run killed with SIGKILL right after a mid-epoch checkpoint and resumed with
    train.resume=auto ends with exactly the weights, optimizer state and metrics of an
    uninterrupted run (deterministic mode: bitwise, no tolerance). `shards`: the same images
    as tar shards (the resumed stream seeks to its (shard, sample) position)."""
    data = make_folder(tmp_path / "data", per_class=(8, 8, 8))  # 6 steps/epoch
    if source == "shards":
        from fastcls.tools.convert import convert_wds
        convert_wds(str(data), str(tmp_path / "shards"), per_shard=5, workers=1, progress=False)
        data = tmp_path / "shards"
    env = dict(run_env(), OMP_NUM_THREADS="1")
    common = ["train.epochs=2", "train.checkpoint_every=2", f"train.device={device}"]
    ref = _train(run_args(data, tmp_path / "ref", *common), env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "fastcls.train", *run_args(data, out, *common)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    side, seen, deadline, mtime = out / "last.pt.sha256", None, time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        if side.is_file() and side.stat().st_mtime_ns != mtime:
            mtime = side.stat().st_mtime_ns
            try:
                state = ckpt.load_verified(out / "last.pt")
            except (ckpt.CheckpointError, FileNotFoundError):
                state = None  # caught between file and digest: poll again
            if state is not None and state["epoch_step"] > 0:
                proc.kill()  # SIGKILL: no handler runs, nothing is flushed
                seen = (state["epoch"], state["epoch_step"])
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and seen is not None, proc.stderr.read()[-2000:]

    res = _train(run_args(data, out, *common, "train.resume=auto"), env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and ", step 0 of it" not in res.stdout, res.stdout
    a, b = ckpt.load(tmp_path / "ref" / "last.pt"), ckpt.load(out / "last.pt")
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ra = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == [1, 2]
    assert rb[-1]["val_loss"] == ra[-1]["val_loss"] and rb[-1]["lr"] == ra[-1]["lr"]
    # The resumed epoch's train stats cover all its steps (the checkpoint carries the sums).
    assert [(r["train_loss"], r["train_top1"]) for r in rb] == \
        [(r["train_loss"], r["train_top1"]) for r in ra]


def test_resume_restores_rng_streams(tmp_path):
    """Dropout-style draws from torch's global RNG continue the same stream after resume."""
    import random

    import numpy as np

    from fastcls.dist import DistInfo
    from fastcls.resume import gather_rng_states, restore_rng_states
    info = DistInfo(0, 0, 1, CPU)
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    saved = gather_rng_states(info)
    ckpt.save_atomic({**_state(0), "rng": saved}, tmp_path / "r.pt")
    want = (torch.rand(4), np.random.rand(2), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    assert restore_rng_states(ckpt.load_verified(tmp_path / "r.pt")["rng"], info)
    got = (torch.rand(4), np.random.rand(2), random.random())
    assert torch.equal(want[0], got[0]) and (want[1] == got[1]).all() and want[2] == got[2]
    assert not restore_rng_states(saved, DistInfo(0, 0, 2, CPU))  # other world size: fresh


# ---------------------------------------------------------------- numerics

def test_nan_loss_stops_naming_step_lr_and_checkpoint(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    rc = main(run_args(data, tmp_path / "nan", "train.epochs=3", "optim.lr=1e12",
                       "train.deterministic=false", "schedule.warmup_epochs=0"))
    err = capsys.readouterr().err
    assert rc == 1, err
    line = [ln for ln in err.splitlines() if "NaN/inf" in ln]
    assert line and "at step " in line[0] and "(lr " in line[0] and "Last checkpoint:" in line[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------- distributed

def test_preemption_flag_agreed_by_all_ranks(tmp_path):
    out = tmp_path / "agree.json"
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "helpers" / "preempt_agreement.py"), str(out)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [x["stopped_at"] for x in r] == [3, 3]  # rank 1's signal after step 3; check every 4
    assert [x["signal"] for x in r] == [None, "SIGUSR1"]


def test_slurm_environment_without_torchrun():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07" and first_host("node1") == "node1"
    assert first_host("a-b[001-004]") == "a-b001"
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert env_from_slurm(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert env_from_slurm({**env, "RANK": "0"}) == {}                 # torchrun already set it
    assert env_from_slurm({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task
    batch_script = {k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert env_from_slurm(batch_script) == {}  # a plain python in the batch script: one process


def test_mid_epoch_resume_at_another_global_batch_maps_the_position(tmp_path, capsys):
    """A mid-epoch checkpoint resumed with another global batch (another world size)
    continues after the same number of images, with a warning that it is not exact."""
    data = make_folder(tmp_path / "data", per_class=(8, 8, 8))  # 24 images: 6 steps of 4
    base = ["train.epochs=1", "train.checkpoint_every=2", "train.deterministic=false"]
    assert main(run_args(data, tmp_path / "a", *base)) == 0
    mid = ckpt.load(tmp_path / "a" / "last.1.pt")
    assert (mid["epoch"], mid["epoch_step"], mid["global_batch"]) == (0, 4, 4)
    capsys.readouterr()
    assert main(run_args(data, tmp_path / "b", *base, "data.batch_size=8",
                         f"train.resume={tmp_path / 'a' / 'last.1.pt'}")) == 0
    out = capsys.readouterr()
    assert "global batch 4, now 8: continuing at step 2 of the epoch" in out.err
    assert "epoch 1, step 2 of it, global step 2" in out.out
    assert ckpt.load(tmp_path / "b" / "last.pt")["step"] == 3


def test_rng_state_holds_this_process_device_only():
    from fastcls.resume import rng_state, set_rng_state
    s = rng_state()
    if not torch.cuda.is_initialized():
        assert s["cuda"] is None
    set_rng_state(s)  # round trip


@pytest.mark.gpu
def test_cuda_rng_state_is_one_device_and_old_lists_still_load():
    """A rank saves its own GPU's generator; a checkpoint of the older format (every visible
    GPU's state, e.g. 8 of them) resumes where fewer GPUs are visible."""
    from fastcls.resume import rng_state, set_rng_state
    torch.cuda.init()
    s = rng_state()
    assert isinstance(s["cuda"], torch.Tensor)
    a = torch.rand(3, device="cuda")
    set_rng_state(s)
    assert torch.equal(torch.rand(3, device="cuda"), a)
    old = dict(s, cuda=[s["cuda"]] * 8)
    set_rng_state(old)
    assert torch.equal(torch.rand(3, device="cuda"), a)


# ---------------------------------------------------------------- a full disk

def _can_mount_tmpfs(where) -> bool:
    """Can this process mount a tmpfs in a private mount namespace (root, `unshare -m`)?"""
    import os
    import shutil
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_stops_with_one_line_and_keeps_last_pt(tmp_path, monkeypatch, capsys):
    """The issue's cluster case: train.out_dir fills up during the epoch-2 checkpoint (a 25 MB
    tmpfs, ~10 MB checkpoints: last.pt + best.pt of epoch 1 fit, a third does not). The run
    stops with one line (file, bytes needed and free, the newest intact checkpoint, the command
    that continues); last.pt is epoch 1's, whole, with no temp file left; the printed command
    continues the run once there is space. Without root (no tmpfs), the checkpoint write
    itself raises ENOSPC."""
    import errno
    import shlex
    import shutil
    data = make_folder(tmp_path / "data")
    out, kept = tmp_path / "out", tmp_path / "kept"
    out.mkdir()
    args = run_args(data, out, "train.epochs=3", "train.keep_checkpoints=2")
    if _can_mount_tmpfs(out):
        cmd = shlex.join([PY, "-m", "fastcls.train", *args])
        script = f"mount -t tmpfs -o size=25m tmpfs {out} && {{ {cmd}; rc=$?; cp -a {out} {kept}; exit $rc; }}"
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=run_env(),
                              capture_output=True, text=True, timeout=300)
        rc, err = proc.returncode, proc.stderr
    else:
        made, init, write = [], ckpt._HashingWriter.__init__, ckpt._HashingWriter.write

        def counting_init(self, f):  # the third checkpoint file (epoch 2's last.pt) meets a full disk
            init(self, f)
            made.append(self)
            self.full = len(made) >= 3

        def full_write(self, b):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(self, b)
        monkeypatch.setattr(ckpt._HashingWriter, "__init__", counting_init)
        monkeypatch.setattr(ckpt._HashingWriter, "write", full_write)
        rc = main(args)
        err = capsys.readouterr().err
        shutil.copytree(out, kept)
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("error")]
    assert line.startswith(f"error (rank 0): cannot write {out / 'last.pt'}: No space left on device (needs about ")
    assert " MB free there); newest intact checkpoint " in line
    assert f"{out / 'last.pt'} (end of epoch 1); free space, then continue with: " in line
    state = ckpt.load_verified(kept / "last.pt")
    assert state["epoch"] == 1 and (kept / "best.pt").is_file()
    assert not [p.name for p in kept.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]
    # the printed command continues the run (in a folder with room), to the end
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "fastcls.train"] and command[-1] == "train.resume=auto"
    command = [PY] + [a.replace(str(out), str(kept)) for a in command[1:]]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckpt.load_verified(kept / "last.pt")["epoch"] == 3
    assert [json.loads(x)["epoch"] for x in (kept / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    """metrics.jsonl whose last record was cut mid-write (no newline): the reader drops it
    and the file, so the resumed run's records start on a line of their own."""
    from fastcls.log import RunLog
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1, "val_top1": 50.0}\n{"epoch": 2, "val_to')
    log = RunLog(tmp_path, enabled=True, progress=False)
    assert log.read_metrics() == [{"epoch": 1, "val_top1": 50.0}]
    log.metrics({"epoch": 2, "val_top1": 60.0})
    assert [json.loads(x)["epoch"] for x in p.read_text().splitlines()] == [1, 2]
