"""Fine-tuning (the guide §9): 1000-class checkpoints into 10-class heads, freezing, LR advice."""
import json
import subprocess

import pytest
import torch
import torchvision

from fastcls import checkpoint
from fastcls.config import ConfigError, load_config
from fastcls.finetune import load_pretrained, lr_warning, set_backbone_frozen, suggested_finetune_lr
from fastcls.models import build_model
from fastcls.train import main

from conftest import PY, ROOT, make_folder, run_env

TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_loaded_except(model, src_state, skipped):
    own = model.state_dict()
    for k, v in src_state.items():
        k = k.removeprefix("module.")
        if k in skipped:
            assert own[k].shape != v.shape
        else:
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)


def test_fastcls_checkpoint_1000_to_10_classes(tmp_path):
    torch.manual_seed(0)
    src = build_model("resnet_tiny", 1000)
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"model": src.state_dict(), "epoch": 3, "classes": ["x"] * 1000}, path)
    torch.manual_seed(1)
    dst = build_model("resnet_tiny", 10)
    report = load_pretrained(dst, path, 10)
    skipped = {"head.2.weight", "head.2.bias"}
    assert {s.split(":")[0] for s in report.skipped} == skipped
    assert "head.2.weight: (1000, 256) -> (10, 256)" in str(report)
    assert report.loaded == len(src.state_dict()) - 2
    _assert_loaded_except(dst, src.state_dict(), skipped)
    assert dst(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_state_dict_with_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({f"module.{k}": v for k, v in src.items()}, path)  # saved from a DDP wrapper
    dst = build_model("ResNet18", 10)
    report = load_pretrained(dst, path, 10)
    assert sorted(s.split(":")[0] for s in report.skipped) == ["fc.bias", "fc.weight"]
    _assert_loaded_except(dst, src, {"fc.weight", "fc.bias"})


def test_timm_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = timm.create_model("resnet18d", num_classes=1000).state_dict()
    path = tmp_path / "model.safetensors"
    save_file(src, str(path))
    dst = build_model("ResNet18_vd", 10)
    report = load_pretrained(dst, path, 10)
    assert sorted(s.split(":")[0] for s in report.skipped) == ["fc.bias", "fc.weight"]
    _assert_loaded_except(dst, src, {"fc.weight", "fc.bias"})


def test_same_head_loads_everything(tmp_path):
    src = build_model("MobileNetV1_x0_25", 10)
    torch.save(src.state_dict(), tmp_path / "m.pth")
    dst = build_model("MobileNetV1_x0_25", 10)
    report = load_pretrained(dst, tmp_path / "m.pth", 10)
    assert report.skipped == [] and report.loaded == len(src.state_dict())


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="does not fit model .*is model.name the checkpoint's architecture"):
        load_pretrained(build_model("ResNet18_vd", 10), tmp_path / "r18.pth", 10)
    torch.save(build_model("MobileNetV1_x0_5", 10).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="only the classifier may differ"):
        load_pretrained(build_model("MobileNetV1_x0_25", 10), tmp_path / "w.pth", 10)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(build_model("ResNet18", 10), tmp_path / "nope.pth", 10)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_pretrained(build_model("ResNet18", 10), tmp_path / "junk.pth", 10)
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ConfigError, match="holds no state_dict"):
        load_pretrained(build_model("ResNet18", 10), tmp_path / "empty.pth", 10)


def test_freeze_leaves_only_the_classifier_trainable():
    m = build_model("MobileNetV2_x0_25", 10)
    changed = set_backbone_frozen(m, 10, True)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.1.weight", "classifier.1.bias"]
    assert changed == sum(1 for _ in m.parameters()) - 2
    assert set_backbone_frozen(m, 10, False) == changed
    assert all(p.requires_grad for p in m.parameters())


# ---------------------------------------------------------------- end to end

def _ft_args(data, out, pretrained, *extra):
    return ["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
            "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
            "data.workers=0", "train.progress=false", f"train.out_dir={out}", "train.amp=off",
            f"model.pretrained={pretrained}", "model.freeze_epochs=1", "optim.lr=0.05", *extra]


def _params(state):  # parameters only: BN running statistics keep updating while frozen
    model = build_model("resnet_tiny", 3)
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def test_finetune_run_freezes_then_unfreezes(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    src = build_model("resnet_tiny", 1000).state_dict()
    torch.save(src, tmp_path / "in1k.pth")
    out = tmp_path / "ft"
    assert main(_ft_args(data, out, tmp_path / "in1k.pth", "train.epochs=1")) == 0
    log = capsys.readouterr().out
    assert "skipped 2 with another shape" in log and "head.2.weight: (1000, 256) -> (3, 256)" in log
    after1 = _params(checkpoint.load(out / "last.pt")["model"])
    for k, v in after1.items():
        if k.startswith("head."):
            continue
        torch.testing.assert_close(v, src[k], rtol=0, atol=0)  # backbone frozen in epoch 1
    assert not torch.equal(after1["head.2.bias"], torch.zeros(3))
    # resume into epoch 2: the backbone trains again
    # (resumed at the unfreeze epoch: the optimizer state saved while frozen covers only the head)
    assert main(_ft_args(data, out, tmp_path / "in1k.pth", "train.epochs=2", "train.resume=auto")) == 0
    after2 = _params(checkpoint.load(out / "last.pt")["model"])
    assert not torch.equal(after2["stem.0.weight"], src["stem.0.weight"])


def test_finetune_freeze_under_torchrun(tmp_path):
    """DDP is rebuilt when the backbone unfreezes (it only reduces params that need grad)."""
    data = make_folder(tmp_path / "data", per_class=(7, 6, 6))
    torch.manual_seed(0)
    torch.save(build_model("resnet_tiny", 1000).state_dict(), tmp_path / "in1k.pth")
    out = tmp_path / "ddp"
    args = _ft_args(data, out, tmp_path / "in1k.pth", "train.epochs=2", "data.batch_size=2")
    proc = subprocess.run([*TORCHRUN, "-m", "fastcls.train", *map(str, args)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone unfrozen" in proc.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_suggested_lr_follows_the_guide():
    assert suggested_finetune_lr(500) == pytest.approx(0.001)
    assert suggested_finetune_lr(200_000) == pytest.approx(0.01)
    assert 0.001 < suggested_finetune_lr(10_000) < 0.01


def test_lr_warning_pure(tmp_path):
    cfg = load_config("pipelines/demo.yaml", [f"model.pretrained={tmp_path}/x.pth", "optim.lr=0.1"])
    assert "looks too large" in lr_warning(cfg, 800)
    assert lr_warning(cfg, 500_000) is not None  # 0.1 > 5 x 0.01
    assert lr_warning(load_config("pipelines/demo.yaml", ["optim.lr=0.1"]), 800) is None  # not fine-tuning
    small = load_config("pipelines/demo.yaml", [f"model.pretrained={tmp_path}/x.pth", "optim.lr=0.001"])
    assert lr_warning(small, 800) is None


def test_print_config_warns_on_large_finetune_lr(folder, tmp_path):
    cmd = [PY, "-m", "fastcls.train", "pipelines/resnet50_bs256.yaml", "--print-config", f"data.train={folder}",
           "data.global_batch_size=4", f"model.pretrained={tmp_path}/in1k.pth"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=run_env(), check=True)
    assert "WARNING: fine-tuning 18 images with optim.lr=0.1" in out.stderr
    assert "suggests ~0.001 at batch 256" in out.stderr
    assert "resolved" in out.stdout  # the YAML on stdout stays clean (no-warning cases: test above)


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam", "adamw", "adadelta", "lars", "lamb"])
def test_every_optimizer_steps_through_freeze_and_unfreeze(name):
    from fastcls.config import OptimConfig
    from fastcls.finetune import fill_momentum_buffers
    from fastcls.optim import build_optimizer
    m = build_model("resnet_tiny", 3)
    opt = build_optimizer(OptimConfig(name=name, no_decay_norm_bias=True), m, 0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    set_backbone_frozen(m, 3, True)
    stem = m.stem[0].weight.detach().clone()
    step()
    assert torch.equal(m.stem[0].weight, stem)
    set_backbone_frozen(m, 3, False)
    fill_momentum_buffers(opt)
    opt.load_state_dict(opt.state_dict())  # as after a resume
    step()
    assert not torch.equal(m.stem[0].weight, stem)


def test_zero_momentum_buffer_is_torchs_first_step():
    from fastcls.finetune import fill_momentum_buffers
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, fused=True)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=False)
    assert fill_momentum_buffers(oa) == 2
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
