"""Time-to-accuracy features: progressive resizing (ffcv-imagenet's rule, on every wired
backend, resumed mid-ramp), train low / test high, the EMA of the weights (against timm's
ModelEmaV3), BlurPool (against timm's BlurPool2d), zero-init of the residual BN, flip TTA,
the FFCV LR schedule (against torch's LinearLR + SequentialLR), the pipelines/fast recipes,
and the scaled-down fast recipe trained end to end."""
import contextlib
import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import yaml

from fastcls import checkpoint as ckpt
from fastcls.config import ConfigError, load_config, resolve
from fastcls.data import build_loader
from fastcls.data.base import train_image_size, val_image_size
from fastcls.dist import DistInfo
from fastcls.ema import ModelEma
from fastcls.models import BlurPoolConv2d, build_model
from fastcls.schedule import build_schedule
from fastcls.train import evaluate, image_size_schedule, main

from conftest import CPU, PY, ROOT, loader_cfg, make_folder, run_env

FAST = sorted((ROOT / "pipelines" / "fast").glob("*.yaml"))
FFCV_ROWS = [p for p in FAST if p.stem.endswith("_epochs")]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# .ci/run sets FASTCLS_REQUIRE_FFCV=1: there a missing ffcv fails these tests instead
HAVE_FFCV = os.environ.get("FASTCLS_REQUIRE_FFCV") == "1" or importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(not HAVE_FFCV, reason="ffcv is not installed (docs/development.md)")
pytestmark = pytest.mark.usefixtures("one_thread")

# Progressive 16 -> 32 px over epochs 0..3 in multiples of 8: 16, 24, 24, 32.
RAMP = {"image_size": 32, "progressive": {"start_size": 16, "start_epoch": 0, "end_epoch": 3,
                                          "multiple": 8}}


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet train_imagenet.py's ImageNetTrainer.get_resolution, as published."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def ramp_cfg(train, val="", **data):
    """conftest's loader config (resnet_tiny, batches of 4, no workers) with the RAMP."""
    return loader_cfg(train, val, **{**RAMP, **data})


# ---------------------------------------------------------------- the size per epoch

@pytest.mark.parametrize("path", FFCV_ROWS, ids=[p.stem for p in FFCV_ROWS])
def test_train_image_size_is_ffcv_get_resolution(path):
    cfg = load_config(path)
    p = cfg.data.progressive
    sizes = [train_image_size(cfg.data, e) for e in range(cfg.train.epochs)]
    assert sizes == [ffcv_get_resolution(e, p.start_size, p.end_size, p.end_epoch, p.start_epoch)
                     for e in range(cfg.train.epochs)]
    assert sizes[0] == 160 and sizes[-1] == 192 and val_image_size(cfg.data) == 256


@pytest.mark.parametrize("start, end, s, e", [(128, 224, 3, 17), (160, 256, 0, 9), (96, 224, 5, 6),
                                              (160, 192, 11, 13), (128, 128, 2, 8)])
def test_train_image_size_on_other_ramps(start, end, s, e):
    cfg = load_config(None, ["data.batch_size=8", f"data.image_size={end}", "train.epochs=20",
                             f"data.progressive.start_size={start}", f"data.progressive.start_epoch={s}",
                             f"data.progressive.end_epoch={e}", "data.val_resize=300"])
    assert [train_image_size(cfg.data, k) for k in range(20)] == \
        [ffcv_get_resolution(k, start, end, e, s) for k in range(20)]


def test_sizes_are_kept_within_the_ramp_and_off_means_image_size():
    # 40 -> 64 in multiples of 32: FFCV's rounding gives 32 < start_size at epochs 1-2
    cfg = load_config(None, ["data.batch_size=8", "data.image_size=64", "train.epochs=10",
                             "data.progressive.start_size=40", "data.progressive.end_epoch=8"])
    ffcv = [ffcv_get_resolution(e, 40, 64, 8, 0) for e in range(10)]
    assert ffcv[1:3] == [32, 32]
    assert [train_image_size(cfg.data, e) for e in range(10)] == [min(max(s, 40), 64) for s in ffcv]
    off = load_config(None, ["data.batch_size=8", "data.image_size=96", "data.val_image_size=128",
                             "data.val_resize=146"])
    assert {train_image_size(off.data, e) for e in range(5)} == {96} and val_image_size(off.data) == 128
    assert image_size_schedule(load_config(pipe("rn50_88_epochs")).data, 88) == \
        {"epochs 1-71": 160, "epochs 72-88": 192}


@pytest.mark.parametrize("over, match", [
    (["data.progressive.start_size=256"], "start_size .256. must be <= end_size .224 = data.image_size"),
    (["data.progressive.start_size=128", "data.progressive.start_epoch=5", "data.progressive.end_epoch=3"],
     "start_epoch .5. must be <= end_epoch .3."),
    (["data.progressive.start_size=128", "data.progressive.end_epoch=90"], "end_epoch .90. must be < train.epochs .90."),
    (["data.progressive.end_epoch=10"], "set start_size > 0"),
    (["data.progressive.multiple=0"], "multiple: must be >= 1"),
    (["data.val_image_size=288"], "data.val_resize .256. must be >= data.val_image_size .288."),
    (["train.ema.decay=1.0"], r"train.ema.decay: must be in \[0, 1\)"),
    (["train.ema.every=0"], "train.ema.every: must be > 0"),
    (["train.eval_tta=hflip"], "train.eval_tta: unknown name 'hflip'; valid choices: none, flip"),
])
def test_config_errors_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.batch_size=8", *over])


def pipe(name):
    return ROOT / "pipelines" / "fast" / f"{name}.yaml"


_HAVE_DALI = __import__("importlib").util.find_spec("nvidia.dali") is not None


_NEEDS_DALI = pytest.mark.skipif(not _HAVE_DALI, reason="no DALI")


def test_synthetic_loader_follows_the_epoch_size():
    cfg = load_config(None, ["model.num_classes=5", "data.backend=synthetic", "data.batch_size=2",
                             "data.synthetic_images=8", "data.image_size=32", "train.epochs=4",
                             "data.progressive.start_size=16", "data.progressive.end_epoch=3",
                             "data.progressive.multiple=8", "data.val_image_size=40", "data.val_resize=40"])
    loader = build_loader(cfg, "train", CPU)
    shapes = []
    for e in range(4):
        loader.set_epoch(e)
        shapes.append({x.shape[-1] for x, _ in loader})
    assert shapes == [{16}, {24}, {24}, {32}]
    assert next(iter(build_loader(cfg, "val", CPU)))[0].shape[-1] == 40


@needs_ffcv
def test_ffcv_decoder_output_size_per_epoch(tmp_path):
    """As ffcv-imagenet: the decoder's output_size is set per epoch, no new Loader."""
    from ffcv.pipeline.compiler import Compiler
    src = make_folder(tmp_path / "train")
    beton = tmp_path / "train.beton"
    proc = subprocess.run([PY, "-m", "fastcls.tools.convert", "--to", "ffcv", str(src), str(beton),
                           "--workers", "2", "--no-progress"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    Compiler.set_enabled(False)  # the same pipeline code, interpreted: no 5-10 s JIT
    try:
        cfg = ramp_cfg(beton, beton, backend="ffcv", workers=1, val_image_size=40, val_resize=44)
        train = build_loader(cfg, "train", CPU)
        for epoch, size in enumerate([16, 24, 24, 32]):
            train.set_epoch(epoch, start_step=1 if epoch == 2 else 0)
            shapes = {tuple(x.shape) for x, _ in train}
            assert shapes == {(4, 3, size, size)}, (epoch, shapes)
        val = build_loader(cfg, "val", CPU, classes=train.classes)
        assert {tuple(x.shape[1:]) for x, _ in val} == {(3, 40, 40)}
    finally:
        Compiler.set_enabled(True)


def test_compile_recompiles_at_most_once_per_size():
    """Shapes change only at epoch boundaries; torch.compile (default dynamic=None) compiles
    the first size, recompiles once with dynamic H and W at the first change, and every later
    size, new or seen, reuses a compiled graph: never more than one compile per size."""
    import torch._dynamo
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build_model("resnet_tiny", 3, blurpool=True).eval()
    compiled = torch.compile(model, backend=counting_backend)
    seen = []
    with torch.no_grad():
        for size in (16, 16, 24, 24, 32, 16, 32):
            compiled(torch.randn(2, 3, size, size))
            seen.append(len(graphs))
    torch._dynamo.reset()
    # 16: compiled; 24: recompiled with dynamic H, W (automatic dynamic shapes); 32 and the
    # sizes met again: that graph. 2 compiles for 3 sizes (docs/data.md states the cost).
    assert seen == [1, 1, 2, 2, 2, 2, 2]


# ---------------------------------------------------------------- EMA

def _tiny_steps(model, steps, seed=0):
    """A weight sequence: SGD steps of `model` in train mode (BatchNorm statistics move too)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=g)
        model.train()
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


@pytest.mark.parametrize("decay, every, warmup", [(0.9, 1, False), (0.8, 3, True), (0.99, 2, False),
                                                   (0.9999, 1, True)])
def test_ema_equals_timm_model_ema_v3(decay, every, warmup):
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 3)
    ours = ModelEma(model, decay, every, warmup)
    ref = ModelEmaV3(model, decay=decay, use_warmup=warmup)
    for step, _ in enumerate(_tiny_steps(model, 10), start=1):
        ours.step(step)
        if step % every == 0:
            ref.update(model, step=step // every)
        a, b = ours.state_dict(), ref.module.state_dict()
        assert list(a) == list(b) == list(model.state_dict())
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    assert ours.updates == 10 // every
    assert not torch.equal(ours.state_dict()["head.2.weight"], model.state_dict()["head.2.weight"])


def test_ema_update_issues_no_syncing_op():
    from test_augment_nosync import SYNCING, OpLog
    model = build_model("resnet_tiny", 3)
    ema = ModelEma(model, 0.9)
    ema.update()
    log = OpLog()
    with log:
        ema.update()
    assert "_foreach_lerp_" in log.ops and not set(log.ops) & SYNCING, log.ops


def test_ema_tracks_the_raw_model_under_compile():
    """torch.compile (and DDP) wrap the raw model without copying its parameters: the EMA of
    the raw model sees every step of the wrapped one; its compiled copy evaluates it."""
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 3)
    ema = ModelEma(model, 0.5)
    wrapped = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    for _ in range(2):
        loss = wrapped(torch.randn(4, 3, 16, 16)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    ema.update()  # 0.5 * ema + 0.5 * model
    w = model.state_dict()["head.2.weight"]
    assert torch.allclose(ema.state_dict()["head.2.weight"], w, atol=1) and \
        not torch.equal(ema.state_dict()["head.2.weight"], w)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(torch.compile(ema.module, backend="eager")(x), ema.module(x))
    torch._dynamo.reset()


# ---------------------------------------------------------------- model options

def test_blurpool_conv_equals_timm_blurpool2d_then_the_conv():
    from timm.layers import BlurPool2d
    torch.manual_seed(0)
    for conv in (nn.Conv2d(16, 8, 3, stride=2, padding=1, bias=False), nn.Conv2d(32, 8, 1, stride=2)):
        ours = BlurPoolConv2d.from_conv(conv)
        ref_blur = BlurPool2d(conv.in_channels, filt_size=3, stride=1, pad_mode="constant")
        for x in (torch.randn(2, conv.in_channels, 15, 17),
                  torch.randn(2, conv.in_channels, 8, 8).to(memory_format=torch.channels_last)):
            torch.testing.assert_close(ours(x), conv(ref_blur(x)), rtol=1e-5, atol=1e-6)
        assert ours.weight is conv.weight and list(ours.state_dict()) == list(conv.state_dict())


@pytest.mark.parametrize("name, replaced", [
    ("resnet50", {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")}),
    ("resnet18", {f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv1", "downsample.0")}),
])
def test_blurpool_on_torchvision_resnets_as_ffcv_applies_it(name, replaced):
    """Blur before each stride-2 conv with >= 16 input channels (not the RGB stem); the
    parameters, their count and the state_dict keys are torchvision's, so torchvision's
    weights load as they are."""
    torch.manual_seed(0)
    ours = build_model(name, 10, blurpool=True)
    ref = torchvision.models.get_model(name, num_classes=10)
    assert {n for n, m in ours.named_modules() if isinstance(m, BlurPoolConv2d)} == replaced
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ref.eval(), ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), ref(x))  # the blur does change the function
    # the filter is there, as a buffer: [1,2,1] x [1,2,1] / 16 per channel
    conv = dict(ours.named_modules())["layer2.0.downsample.0"]
    assert conv.blur_filter.shape == (conv.in_channels, 1, 3, 3)
    assert conv.blur_filter[0, 0].tolist() == [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16],
                                               [1 / 16, 2 / 16, 1 / 16]]


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "ResNet34"])
def test_zero_init_residual_is_torchvisions_argument(name):
    tv = {"ResNet34": "resnet34"}.get(name, name)
    torch.manual_seed(0)
    ours = build_model(name, 10, zero_init_residual=True)
    torch.manual_seed(0)
    ref = torchvision.models.get_model(tv, num_classes=10, zero_init_residual=True)
    a, b = ours.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    torch.manual_seed(0)
    plain = build_model(name, 10)
    assert any(not torch.equal(plain.state_dict()[k], b[k]) for k in b)  # the option did something


def test_zero_init_residual_on_timm_and_errors():
    t = build_model("timm:resnet18", 10, zero_init_residual=True)
    assert all((m.bn2.weight == 0).all() for m in t.modules() if type(m).__name__ == "BasicBlock")
    with pytest.raises(ValueError, match="model.zero_init_residual: mobilenet_v2 has no residual"):
        build_model("mobilenet_v2", 10, zero_init_residual=True)


# ---------------------------------------------------------------- flip TTA

def test_flip_tta_is_the_mean_of_image_and_mirror_logits(folder):
    from torchvision.transforms.v2 import functional as TF
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 3).eval()
    cfg = loader_cfg(folder, folder)
    loader = build_loader(cfg, "val", CPU, classes=["a", "b", "c"])
    dist = DistInfo(0, 0, 1, CPU)
    got = evaluate(model, loader, contextlib.nullcontext, dist, tta="flip")
    plain = evaluate(model, loader, contextlib.nullcontext, dist)
    loss, top1, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = (model(x) + model(TF.horizontal_flip(x))) / 2
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            top1 += (logits.argmax(1) == y).sum().item()
            n += len(y)
    assert got["val_images"] == n == 18
    assert got["val_loss"] == pytest.approx(loss / n, rel=1e-6)
    assert got["val_top1"] == pytest.approx(100 * top1 / n)
    assert got["val_loss"] != pytest.approx(plain["val_loss"], rel=1e-6)


# ---------------------------------------------------------------- the recipes

def test_ffcv_schedule_equals_torch_linearlr_then_linear_decay():
    """ffcv-imagenet's cyclic LR (1e-4 x peak -> peak at epoch 2 -> 0 at the end, per
    iteration) is schedule.warmup_epochs 2 from 1e-4 + polynomial power 1: checked against
    torch's LinearLR + SequentialLR and against ffcv-imagenet's np.interp formula."""
    cfg = load_config(pipe("rn50_16_epochs"))
    res = resolve(cfg, 8)
    assert res.global_batch_size == 4096 and res.batch_size == 512 and res.lr == pytest.approx(1.7)
    spe, epochs = 9, cfg.train.epochs
    lr_at = build_schedule(cfg.schedule, res.lr, spe, epochs)
    total, warm = spe * epochs, 2 * spe
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=res.lr)
    lin = torch.optim.lr_scheduler
    sched = lin.SequentialLR(opt, [lin.LinearLR(opt, start_factor=1e-4, end_factor=1.0, total_iters=warm),
                                   lin.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=total - warm)],
                             milestones=[warm])
    ffcv = lambda e: np.interp([e], [0, 2, epochs], [1e-4 * res.lr, res.lr, 0])[0]  # get_cyclic_lr
    for step in range(total):
        e, ix = divmod(step, spe)
        assert lr_at(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        assert lr_at(step) == pytest.approx(np.interp(ix, [0, spe], [ffcv(e), ffcv(e + 1)]), rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


@pytest.mark.parametrize("path", FAST, ids=[p.stem for p in FAST])
def test_every_fast_recipe_resolves(path, capsys, demo_cache, monkeypatch):
    monkeypatch.setenv("FASTCLS_CACHE", str(demo_cache))
    cfg = load_config(path)
    world = max(1, (cfg.data.global_batch_size or 0) // 512)  # the published GPU counts: 8 / 1 / 4
    assert main([str(path), "--print-config", "--world-size", str(world)]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    sizes = tree["resolved"]["train_image_size"]
    assert list(sizes.values())[0] == cfg.data.progressive.start_size
    assert list(sizes.values())[-1] == (cfg.data.progressive.end_size or cfg.data.image_size)
    if path in FFCV_ROWS:
        rn50 = path.stem.startswith("rn50")
        assert tree["resolved"]["lr_effective"] == pytest.approx(1.7 if rn50 else 0.5)
        assert tree["resolved"]["global_batch_size"] == (4096 if rn50 else 1024)
        assert (cfg.model.blurpool, cfg.train.eval_tta, cfg.augment.label_smoothing) == (True, "flip", 0.1)
        assert cfg.optim.weight_decay == (1e-4 if rn50 else 5e-5) and cfg.train.epochs == int(path.stem.split("_")[1])


def test_docs_table_names_every_fast_recipe():
    page = (ROOT / "docs" / "fast.md").read_text()
    for p in FAST:
        assert f"fast/{p.name}" in page, p.name


# ---------------------------------------------------------------- end to end

def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# On native:batched, the default decode path on CUDA (byte-reading workers, torchvision decode,
# the crop kernel at each epoch's size). The features are the loop's, not the backend's; each
# path's progressive and val sizes are in test_data.py's matrix (FFCV's in test_ffcv.py).
@pytest.mark.parametrize("backend", ["native:batched"])
def test_fast_demo_trains_end_to_end(backend, demo_cache, tmp_path):
    """pipelines/fast/demo.yaml shortened to 3 epochs: progressive 48 -> 56 -> 64 px, EMA,
    flip TTA, BlurPool, validation at 80 px; the mechanics only (no accuracy claim)."""
    out = tmp_path / backend.replace(":", "_")
    name, *decode = backend.split(":")
    extra = [f"data.native_decode={decode[0]}"] if decode else []
    # the mechanics need no accuracy: 30 of each class's 100 demo images (hard links), all 200 val
    demo = demo_cache / "demo-v1"
    for src in sorted((demo / "train").iterdir()):
        (tmp_path / "train" / src.name).mkdir(parents=True)
        for f in sorted(src.iterdir())[:30]:
            os.link(f, tmp_path / "train" / src.name / f.name)
    extra += [f"data.train={tmp_path / 'train'}", f"data.val={demo / 'val'}"]
    proc = subprocess.run([PY, "-m", "fastcls.train", "pipelines/fast/demo.yaml", f"data.backend={name}", *extra,
                           "train.epochs=3", "data.progressive.start_epoch=0", "data.progressive.end_epoch=2",
                           f"train.out_dir={out}", "train.progress=false"],
                          cwd=ROOT, env=run_env(demo_cache), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["image_size"] for r in rows] == [48, 56, 64]
    for r in rows:
        assert {"val_top1_ema", "val_top5_ema", "val_loss_ema"} <= set(r) and r["val_images"] == 200
    state = ckpt.load(out / "last.pt")
    assert list(state["ema"]) == list(state["model"]) and state["ema_updates"] == state["step"]
    best = ckpt.load(out / "best_ema.pt")
    assert best["best_ema_top1"] == max(r["val_top1_ema"] for r in rows)
    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert resolved["train_image_size"] == {"epoch 1": 48, "epoch 2": 56, "epoch 3": 64}
    plain = build_model("resnet_tiny", 10)  # the EMA weights load into the plain model
    plain.load_state_dict(state["ema"])


def test_mid_ramp_resume_continues_at_the_right_size_bitwise(tmp_path):
    """A run resumed from a mid-epoch checkpoint inside the ramp trains the rest at the same
    sizes and ends with exactly the weights and EMA of the uninterrupted run."""
    data = make_folder(tmp_path / "data", per_class=(8, 8, 8))  # 6 steps of 4 per epoch
    args = ["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
            "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_image_size=40",
            "data.val_resize=44", "data.progressive.start_size=16", "data.progressive.end_epoch=3",
            "data.progressive.multiple=8", "data.workers=0", "train.progress=false", "train.amp=off",
            "train.deterministic=true", "train.epochs=4", "train.checkpoint_every=2",
            "train.keep_checkpoints=20", "train.ema.decay=0.8", "train.ema.every=2", "train.ema.warmup=true",
            "train.eval_tta=flip", "model.blurpool=true"]
    assert main([*args, f"train.out_dir={tmp_path / 'ref'}"]) == 0
    mids = [p for p in ckpt.candidates(tmp_path / "ref")
            if (lambda s: (s["epoch"], s["epoch_step"]) == (1, 4))(ckpt.load(p))]
    assert len(mids) == 1  # epoch 2 (24 px), 4 of its 6 steps done
    assert main([*args, f"train.out_dir={tmp_path / 'res'}", f"train.resume={mids[0]}"]) == 0
    ref, res = _rows(tmp_path / "ref"), _rows(tmp_path / "res")
    assert [r["image_size"] for r in ref] == [16, 24, 24, 32]
    assert [(r["epoch"], r["image_size"]) for r in res] == [(2, 24), (3, 24), (4, 32)]
    a, b = ckpt.load(tmp_path / "ref" / "last.pt"), ckpt.load(tmp_path / "res" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == 12
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert [r["val_loss_ema"] for r in ref[1:]] == [r["val_loss_ema"] for r in res]


def test_ddp_trains_the_fast_features(tmp_path):
    """Under torchrun (2 ranks, gloo): EMA of the unwrapped model (no `module.` keys),
    progressive sizes, flip TTA and validation at another size."""
    data = make_folder(tmp_path / "data", per_class=(7, 6, 6))
    out = tmp_path / "run"
    proc = subprocess.run(
        [*TORCHRUN, "-m", "fastcls.train", "pipelines/fast/demo.yaml", f"data.train={data}", f"data.val={data}",
         "model.num_classes=3", "data.batch_size=2", "data.image_size=32", "data.progressive.start_size=16",
         "data.progressive.end_size=32",
         "data.progressive.start_epoch=0", "data.progressive.end_epoch=1", "data.val_image_size=40",
         "data.val_resize=40", "data.workers=1", "train.epochs=2", f"train.out_dir={out}", "train.progress=false"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["image_size"] for r in rows] == [16, 32] and rows[-1]["val_images"] == 19
    assert all("val_top1_ema" in r for r in rows)
    state = ckpt.load(out / "last.pt")
    assert list(state["ema"]) == list(state["model"]) and not any(k.startswith("module.") for k in state["ema"])
