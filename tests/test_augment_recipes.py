"""The guide's augmentation recipes (pipelines/guide/resnet50_aug_*.yaml) load, validate and
build the intended chain; augment config errors name the key."""

import pytest
import torch

from fastcls.augment import build_augmenter
from fastcls.config import ConfigError, load_config

from conftest import ROOT

GUIDE = {  # recipe -> (augmentations it must turn on, guide test top-1)
    "baseline": ([], 77.31), "autoaugment": (["autoaugment"], 77.95), "mixup": (["mixup"], 78.28),
    "cutmix": (["mixup"], 78.39), "cutout": (["cutout"], 78.01), "gridmask": (["gridmask"], 77.85),
    "randaugment": (["randaugment"], 77.70), "random_erasing": (["random_erasing"], 77.91),
    "hide_and_seek": (["hide_and_seek"], 77.43),
}


def test_every_guide_recipe_is_listed():
    files = {p.stem for p in (ROOT / "pipelines" / "guide").glob("resnet50_aug_*.yaml")}
    assert files == {f"resnet50_aug_{k}" for k in GUIDE}


@pytest.mark.parametrize("name", list(GUIDE))
def test_guide_recipe_loads_and_runs_its_chain(name):
    path = ROOT / "pipelines" / "guide" / f"resnet50_aug_{name}.yaml"
    cfg = load_config(path)
    assert cfg.model.name == "resnet50" and cfg.train.epochs == 300 and cfg.schedule.name == "cosine"
    assert cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4 and cfg.data.global_batch_size == 256
    want, top1 = GUIDE[name]
    assert f"{top1:.2f}%" in path.read_text()
    aug = build_augmenter(cfg.augment, cfg.model.num_classes)
    assert aug.names == want
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 999])
    out, t = aug(x, y, epoch=0, step=0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert (t.shape == (4, 1000)) if name in ("mixup", "cutmix") else (t is y)
    if name == "cutmix":
        assert cfg.augment.mixup.cutmix_alpha == 0.2 and cfg.augment.mixup.mixup_alpha == 0
    if name == "mixup":
        assert cfg.augment.mixup.mixup_alpha == 0.2 and cfg.augment.mixup.cutmix_alpha == 0


def test_defaults_are_off():
    cfg = load_config(None, ["data.batch_size=8"])
    assert build_augmenter(cfg.augment, 10).names == []


@pytest.mark.parametrize("override,msg", [
    ("augment.mixup.mode=pairs", "augment.mixup.mode: unknown name 'pairs'; valid choices: batch, pair, elem"),
    ("augment.mixup.prob=1.5", "augment.mixup.prob: must be in [0, 1]"),
    ("augment.mixup.cutmix_minmax=[0.8,0.2]", "augment.mixup.cutmix_minmax: must satisfy"),
    ("augment.random_erasing.fill=noise", "augment.random_erasing.fill: unknown name 'noise'"),
    ("augment.random_erasing.area=[0.5,0.1]", "augment.random_erasing.area"),
    ("augment.gridmask.d2=50", "augment.gridmask.d2 (50) must be > augment.gridmask.d1 (96)"),
    ("augment.randaugment.magnitude=11", "augment.randaugment.magnitude: must be in 0..num_magnitude_bins-1"),
    ("augment.autoaugment.policy=imagnet", "augment.autoaugment.policy: unknown name 'imagnet'"),
    ("augment.cutot.enabled=true", "unknown key 'augment.cutot'. Did you mean 'cutout'?"),
    ("augment.hide_and_seek.grid_sizes=[]", "augment.hide_and_seek.grid_sizes"),
])
def test_augment_config_errors_name_the_key(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.batch_size=8", override])
    assert msg in str(e.value)


def test_augment_benchmark_smoke(tmp_path):
    import json
    import subprocess

    from conftest import PY, run_env
    out = tmp_path / "augment.json"
    proc = subprocess.run([PY, "benchmarks/augment.py", "--device", "cpu", "--batch-size", "4",
                           "--image-size", "32", "--warmup", "0", "--repeats", "1", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {row["augment"] for row in r["results"]} >= {"autoaugment", "randaugment", "cutout", "random_erasing",
                                                        "gridmask", "hide_and_seek", "mixup", "cutmix"}
    assert all(row["img_per_s"] > 0 for row in r["results"]) and r["settings"]["batch_size"] == 4
