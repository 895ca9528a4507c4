"""The training loop's gradient accumulation (equals the bigger batch, in one process and over
DDP with no_sync; the global batch, LR and steps follow it; resume lands on optimizer-step
boundaries), gradient clipping (against torch.nn.utils.clip_grad_norm_, fp16 after
GradScaler.unscale_), TensorBoard event files (read back with tensorboard's
EventAccumulator), and none of them adds a host/device sync per step."""
import contextlib
import json
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from test_augment_nosync import SYNCING, OpLog

from fastcls import checkpoint as ckpt
from fastcls.config import ConfigError, config_from_dict, load_config, resolve
from fastcls.data import build_loader
from fastcls.dist import DistInfo
from fastcls.log import RunLog
from fastcls.optim import build_optimizer
from fastcls.schedule import build_schedule
from fastcls.train import EpochContext, main, train_one_epoch

from conftest import PY, ROOT, make_folder, run_env

TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CPU = torch.device("cpu")
ONE = DistInfo(0, 0, 1, CPU)
NO_AUG = {"hflip": 0.0, "rrc": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}, "image_size": 32, "workers": 0}
pytestmark = pytest.mark.usefixtures("one_thread")


def net():
    """No BatchNorm: accumulating micro-batches is then exactly the bigger batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def cfg_for(data, batch, accum=1, clip=0.0, **train):
    return config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3},
                             "data": {"train": str(data), "batch_size": batch, **NO_AUG},
                             "optim": {"lr": 3.2, "momentum": 0.9, "weight_decay": 1e-4, "clip_grad_norm": clip},
                             "train": {"accum_steps": accum, "log_every": 1, **train}})


def loop_epoch(cfg, model, loader, *, amp="off", log=None):
    """One epoch of fastcls's train_one_epoch; -> (flat weights, optimizer steps, stats)."""
    res = resolve(cfg, 1)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    autocast = (lambda: torch.autocast("cpu", dtype=torch.float16)) if amp == "fp16" else contextlib.nullcontext
    ctx = EpochContext(model, build_optimizer(cfg.optim, model, res.lr), scaler, nn.CrossEntropyLoss(),
                       lambda s: res.lr, autocast, None, cfg, ONE, log or RunLog(".", enabled=False))
    loader.set_epoch(0)
    stats, steps = train_one_epoch(ctx, loader, epoch=0, step=0)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), steps, stats


# ---------------------------------------------------------------- accumulation

def test_accumulation_equals_the_bigger_batch(tmp_path):
    """19 images: 9 micro-batches of 2 -> 4 optimizer steps of 2 x 2 (the 9th is read, not
    trained on) = 4 steps of 4, weights and epoch statistics alike."""
    data = make_folder(tmp_path / "d", per_class=(7, 6, 6))
    a_cfg, b_cfg = cfg_for(data, 2, accum=2), cfg_for(data, 4)
    assert resolve(a_cfg, 1).global_batch_size == resolve(b_cfg, 1).global_batch_size == 4
    assert resolve(a_cfg, 1).lr == resolve(b_cfg, 1).lr
    a_loader = build_loader(a_cfg, "train", CPU)
    assert len(a_loader) == 9
    a, steps_a, stats_a = loop_epoch(a_cfg, net(), a_loader)
    b, steps_b, stats_b = loop_epoch(b_cfg, net(), build_loader(b_cfg, "train", CPU))
    assert steps_a == steps_b == 4 and stats_a["epoch_steps"] == 4
    assert (a - b).abs().max().item() < 1e-6
    assert (a - torch.cat([p.flatten() for p in net().parameters()])).abs().max().item() > 1e-3
    assert stats_a["train_loss"] == pytest.approx(stats_b["train_loss"], rel=1e-6)
    assert stats_a["epoch_sums"][2] == stats_b["epoch_sums"][2] == 16  # images trained on


class Counting:
    """A loader wrapper counting the micro-batches drawn from it."""

    def __init__(self, loader):
        self.loader, self.drawn = loader, 0
        self.bad_files = loader.bad_files

    def __len__(self):
        return len(self.loader)

    def epoch_warnings(self):
        return self.loader.epoch_warnings()

    def __iter__(self):
        for batch in self.loader:
            self.drawn += 1
            yield batch


def test_preemption_stops_on_an_optimizer_step_boundary(tmp_path):
    """A signal already received: the epoch stops after its first optimizer step, i.e. after
    both of its micro-batches, never between them (the checkpoint holds no half-accumulated
    gradients)."""
    from fastcls.preempt import Preemption
    data = make_folder(tmp_path / "d")
    cfg = cfg_for(data, 2, accum=2)
    loader = build_loader(cfg, "train", CPU)
    loader.set_epoch(0)
    counting = Counting(loader)
    model = net()
    res = resolve(cfg, 1)
    ctx = EpochContext(model, build_optimizer(cfg.optim, model, res.lr), None, nn.CrossEntropyLoss(),
                       lambda s: res.lr, contextlib.nullcontext, None, cfg, ONE, RunLog(".", enabled=False))
    with Preemption(ONE, check_every=1, signals=()) as stop:
        stop.requested = "SIGUSR1"
        ctx.stop = stop
        stats, step = train_one_epoch(ctx, counting, epoch=0, step=0)
    assert stats["epoch_steps"] == step == 1 and counting.drawn == 2
    assert stats["epoch_sums"][2] == 4  # both micro-batches' images


def test_accumulation_under_torchrun_equals_the_bigger_batch_and_skips_allreduces(tmp_path):
    data = make_folder(tmp_path / "d", per_class=(10, 10, 10))
    out = tmp_path / "accum.json"
    helper = ROOT / "tests" / "helpers" / "accum_equivalence.py"
    proc = subprocess.run([*TORCHRUN, str(helper), str(data), str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["steps"] == [3, 3, 3] and r["global_batch"] == [8, 8, 8]
    assert r["lr"][0] == r["lr"][1] == r["lr"][2] == pytest.approx(3.2 * 8 / 256)
    calls_accum, calls_batch = r["allreduce_calls"]
    assert calls_batch >= 3 and calls_accum == calls_batch  # no_sync: one all-reduce per optimizer step
    assert r["moved"] > 1e-3 and r["rank_diff"] == 0.0
    assert r["accum_vs_batch"] < 1e-6 and r["accum_vs_single"] < 1e-5, r
    assert r["train_loss"][0] == pytest.approx(r["train_loss"][1], rel=1e-6)


def small_run(data, out, *extra):
    return main(["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "model.num_classes=3",
                 "data.image_size=32", "data.val_resize=32", "data.workers=0", "train.progress=false",
                 f"train.out_dir={out}", "train.amp=off", *extra])


def test_accumulated_run_resolves_the_global_batch_and_resumes_on_step_boundaries(tmp_path):
    """A run with 2 micro-batches of 2: config.yaml reports the global batch of 4, the LR
    for 4, and optimizer steps; a mid-epoch checkpoint resumed (train.resume=auto) ends
    bitwise where the uninterrupted run did."""
    data = make_folder(tmp_path / "d")  # 18 images: 9 micro-batches of 2 -> 4 steps per epoch
    common = ["data.batch_size=2", "train.accum_steps=2", "train.epochs=2", "train.deterministic=true",
              "train.log_every=1", "schedule.warmup_epochs=1"]
    a = tmp_path / "a"
    assert small_run(data, a, *common, "train.checkpoint_every=1", "train.keep_checkpoints=12") == 0
    res = yaml.safe_load((a / "config.yaml").read_text())["resolved"]
    assert (res["batch_size_per_process"], res["accum_steps"], res["global_batch_size"]) == (2, 2, 4)
    assert (res["steps_per_epoch"], res["total_steps"], res["warmup_steps"]) == (4, 8, 4)
    assert res["lr_effective"] == pytest.approx(0.8 * 4 / 256)
    final = ckpt.load(a / "last.pt")
    assert final["step"] == 8 and final["global_batch"] == 4
    mids = [p for p in a.glob("last*.pt") if (lambda s: (s["epoch"], s["epoch_step"]))(ckpt.load(p)) == (1, 2)]
    assert len(mids) == 1
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(mids[0], b / "last.pt")
    shutil.copy(f"{mids[0]}.sha256", b / "last.pt.sha256")
    (b / "last.pt.sha256").write_text((b / "last.pt.sha256").read_text().replace(mids[0].name, "last.pt"))
    assert small_run(data, b, *common, "train.resume=auto") == 0
    resumed = ckpt.load(b / "last.pt")
    assert resumed["step"] == 8
    for k in final["model"]:
        assert torch.equal(final["model"][k], resumed["model"][k]), k
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert rows_b[-1]["val_top1"] == rows_a[-1]["val_top1"] and rows_b[-1]["lr"] == rows_a[-1]["lr"]
    assert rows_b[-1]["train_loss"] == pytest.approx(rows_a[-1]["train_loss"], rel=1e-9)


def test_print_config_with_accumulation_runs_the_4096_recipe_on_2_gpus(capsys):
    assert main(["pipelines/imagenet_bs4096.yaml", "--print-config", "--world-size", "2",
                 "train.accum_steps=8"]) == 0
    r = yaml.safe_load(capsys.readouterr().out)["resolved"]
    assert (r["world_size"], r["batch_size_per_process"], r["accum_steps"]) == (2, 256, 8)
    assert r["global_batch_size"] == 4096
    assert r["lr_effective"] == pytest.approx(1.6)
    c = load_config(ROOT / "pipelines" / "imagenet_bs4096.yaml", ["train.accum_steps=3"])
    with pytest.raises(ConfigError, match="does not divide over 2 processes x 3 accumulation steps"):
        resolve(c, 2)
    per = load_config(ROOT / "pipelines" / "resnet50_bs256.yaml", ["data.batch_size=128", "train.accum_steps=4"])
    r = resolve(per, 2, train_images=10_000)
    assert (r.global_batch_size, r.steps_per_epoch) == (1024, 5000 // 512)
    assert r.lr == pytest.approx(0.1 * 1024 / 256)


@pytest.mark.parametrize("override, needle", [
    ("train.accum_steps=0", "train.accum_steps: must be >= 1"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm: must be >= 0"),
    ("train.tensorboard=yes please", "train.tensorboard: expected true/false")])
def test_knob_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ROOT / "pipelines" / "demo.yaml", [override])


# ---------------------------------------------------------------- clipping

def reference_epoch(cfg, loader, *, amp, accum, clip):
    """A plain torch loop: accumulate, (fp16: GradScaler.unscale_), clip_grad_norm_, step."""
    model = net()
    res = resolve(cfg, 1)
    opt = build_optimizer(cfg.optim, model, res.lr)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    norms = []
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(len(loader) // accum):
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            x, y = next(it)
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                loss = F.cross_entropy(model(x), y) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), norms


@pytest.mark.parametrize("amp, accum", [("off", 1), ("fp16", 1), ("off", 2)])
def test_clip_grad_norm_matches_torch(tmp_path, amp, accum):
    data = make_folder(tmp_path / "d")
    clip = 0.05
    cfg = cfg_for(data, 4 // accum, accum=accum, clip=clip)
    ours, _, _ = loop_epoch(cfg, net(), build_loader(cfg, "train", CPU), amp=amp)
    ref, norms = reference_epoch(cfg, build_loader(cfg, "train", CPU), amp=amp, accum=accum, clip=clip)
    assert len(norms) == 4 and min(norms) > clip  # clipping was active on every step
    assert (ours - ref).abs().max().item() < 1e-6
    plain_cfg = cfg_for(data, 4 // accum, accum=accum)
    unclipped, _, _ = loop_epoch(plain_cfg, net(), build_loader(cfg, "train", CPU), amp=amp)
    assert (unclipped - ref).abs().max().item() > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_accumulation_and_clipping_on_gpu(tmp_path, compile_):
    """On CUDA (fp16 GradScaler, optionally torch.compile): 2 x 2 accumulated equals one batch
    of 4 for a model without BatchNorm, to fp16 rounding, with clipping on."""
    data = make_folder(tmp_path / "d", per_class=(7, 6, 6))
    dev = torch.device("cuda")
    out = []
    for batch, accum in ((2, 2), (4, 1)):
        cfg = cfg_for(data, batch, accum=accum, clip=0.05)
        model = net().to(dev)
        res = resolve(cfg, 1)
        ctx = EpochContext(torch.compile(model) if compile_ else model, build_optimizer(cfg.optim, model, res.lr),
                           torch.amp.GradScaler("cuda"), nn.CrossEntropyLoss(), lambda s: res.lr,
                           lambda: torch.autocast("cuda", dtype=torch.float16), None, cfg,
                           DistInfo(0, 0, 1, dev), RunLog(".", enabled=False))
        loader = build_loader(cfg, "train", dev)
        loader.set_epoch(0)
        _, steps = train_one_epoch(ctx, loader, epoch=0, step=0)
        assert steps == 4
        out.append(torch.cat([p.detach().flatten().float() for p in model.parameters()]))
    assert (out[0] - out[1]).abs().max().item() < 1e-3


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_event_files_hold_the_bar_and_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = make_folder(tmp_path / "d")
    out = tmp_path / "run"
    assert small_run(data, out, "data.batch_size=4", "train.epochs=2", "train.log_every=2",
                     "train.tensorboard=true", "optim.clip_grad_norm=1.0") == 0
    files = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "train/data_stall"} <= tags
    assert [e.step for e in ea.Scalars("train/loss")] == [2, 4, 6, 8]  # every log_every steps
    cfg = load_config(out / "config.yaml")
    lr_at = build_schedule(cfg.schedule, resolve(cfg, 1).lr, 4, 2)
    assert [e.value for e in ea.Scalars("train/lr")] == pytest.approx([lr_at(s - 1) for s in (2, 4, 6, 8)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and key != "epoch":
            got = [(e.step, e.value) for e in ea.Scalars(f"epoch/{key}")]
            assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
        elif isinstance(value, str):
            assert f"epoch/{key}/text_summary" in ea.Tags()["tensors"]


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"train.tensorboard: true needs the tensorboard package: pip install"):
        RunLog(tmp_path, enabled=True, tensorboard=True)
    RunLog(tmp_path, enabled=False, tensorboard=True)  # ranks other than 0 never import it


class Batches:
    """A fixed list of batches behind the loader interface train_one_epoch uses."""

    def __init__(self, batches):
        self.batches, self.bad_files = batches, []

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, start_step=0):
        pass

    def epoch_warnings(self):
        return []

    def __iter__(self):
        return iter(self.batches)


def test_accumulation_clipping_and_tensorboard_add_no_sync_per_step(tmp_path):
    """The aten ops of an epoch with accumulation, clipping and TensorBoard on: the syncing
    ones do not grow with the number of steps when only the last step logs (and do when
    every step logs: the trace sees them)."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 3, (2,), generator=gen))
               for _ in range(8)]
    log = RunLog(tmp_path, enabled=True, progress=False, tensorboard=True)

    def syncs(n_micro, log_every):
        cfg = config_from_dict({"model": {"name": "resnet_tiny", "num_classes": 3, "channels_last": False},
                                "data": {"batch_size": 2}, "optim": {"clip_grad_norm": 0.5},
                                "train": {"accum_steps": 2, "log_every": log_every}})
        ctx = EpochContext(net(), None, None, nn.CrossEntropyLoss(), lambda s: 0.1, contextlib.nullcontext,
                           None, cfg, ONE, log)
        ctx.optimizer = build_optimizer(cfg.optim, ctx.model, 0.1)
        train_one_epoch(ctx, Batches(batches[:2]), epoch=0, step=0)  # warm
        trace = OpLog()
        with trace:
            train_one_epoch(ctx, Batches(batches[:n_micro]), epoch=0, step=0)
        return sum(op in SYNCING for op in trace.ops), trace.ops

    two, ops = syncs(4, log_every=100)
    four, _ = syncs(8, log_every=100)
    every, _ = syncs(8, log_every=1)
    assert "_foreach_norm" in ops or "linalg_vector_norm" in ops  # clipping ran
    assert two == four and every > four, (two, four, every)
    log.close()


def test_trainer_under_torchrun_with_accumulation_clipping_and_tensorboard(tmp_path):
    """The real trainer on 2 processes with 2 micro-batches of 2 each: data.global_batch_size=8
    resolved to 2 per process, its LR, optimizer steps per epoch, each val image once across
    the ranks, DataLoader workers under torchrun; one TensorBoard event file (rank 0's)."""
    data = make_folder(tmp_path / "d", per_class=(7, 6, 6))
    out = tmp_path / "run"
    proc = subprocess.run(
        [*TORCHRUN, "-m", "fastcls.train", "pipelines/demo.yaml", f"data.train={data}", f"data.val={data}",
         "model.num_classes=3", "data.global_batch_size=8", "train.accum_steps=2", "optim.clip_grad_norm=1.0",
         "train.tensorboard=true", "train.log_every=1", "data.image_size=32", "data.val_resize=32",
         "data.workers=1", "train.epochs=2", f"train.out_dir={out}", "train.progress=false"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert (res["world_size"], res["accum_steps"], res["global_batch_size"]) == (2, 2, 8)
    assert res["batch_size_per_process"] == 2
    assert res["steps_per_epoch"] == (19 // 2) // 4 and res["lr_effective"] == pytest.approx(0.8 * 8 / 256)
    assert "global batch 8 (2/process x 2 accumulation steps)" in proc.stdout
    assert ckpt.load(out / "last.pt")["step"] == 2 * 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_images"] == 19
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
