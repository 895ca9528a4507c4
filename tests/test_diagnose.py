"""Fit diagnosis (the guide §8) on crafted metrics, and in a real run's metrics.jsonl."""
import json

import pytest

from fastcls.config import load_config
from fastcls.diagnose import diagnose, mixing_active, train_acc_source
from fastcls.train import main

from conftest import make_folder


def cfg(*overrides):
    return load_config("pipelines/resnet50_bs256.yaml", list(overrides))


@pytest.mark.parametrize("train, val, verdict", [
    (78.0, 77.5, "healthy"),          # slightly above
    (77.0, 77.0, "healthy"),          # equal
    (76.5, 77.2, "healthy"),          # below by less than diagnose_underfit_gap (1.0)
    (82.6, 77.5, "overfitting"),      # gap 5.1 > 5.0
    (99.0, 60.0, "overfitting"),
    (43.79, 50.41, "underfitting"),   # the guide's MobileNetV1_x0_25, l2_decay 1e-4
    (75.13, 77.65, "underfitting"),   # the guide's ResNet50 + RandAugment, l2_decay 1e-4
])
def test_verdicts(train, val, verdict):
    assert diagnose(train, val, cfg()).verdict == verdict


def test_thresholds_are_knobs():
    assert diagnose(80.0, 77.0, cfg()).verdict == "healthy"
    assert diagnose(80.0, 77.0, cfg("train.diagnose_overfit_gap=2")).verdict == "overfitting"
    assert diagnose(76.5, 77.2, cfg("train.diagnose_underfit_gap=0.5")).verdict == "underfitting"


def test_underfitting_names_knobs_with_current_values():
    c = cfg("optim.l2_decay=1e-4", "augment.label_smoothing=0.1")
    line = diagnose(43.79, 50.41, c).line
    assert line.startswith("fit: underfitting: train top-1 43.79% (running) vs val 50.41% (gap -6.62)")
    assert "lower optim.weight_decay (l2_decay, now 0.0001" in line
    assert "larger crop area data.rrc.scale (now [0.08, 1]" in line
    assert "weaker stretch data.rrc.ratio (now [0.75, 1.3333]" in line
    assert "no label smoothing augment.label_smoothing (now 0.1" in line
    # knobs already at their weakest are not suggested
    weak = cfg("optim.weight_decay=0", "data.rrc.scale=[0.5,1.0]", "data.rrc.ratio=[0.9,1.1]")
    line = diagnose(43.79, 50.41, weak).line
    assert "weight_decay" not in line and "rrc" not in line and "label_smoothing" not in line
    assert "larger model or more epochs" in line


def test_overfitting_names_knobs_with_current_values():
    line = diagnose(95.0, 70.0, cfg("optim.weight_decay=3e-5", "data.rrc.scale=[0.35,1.0]")).line
    assert "fit: overfitting" in line and "more regularization" in line
    assert "raise optim.weight_decay (l2_decay, now 3e-05; e.g. 6e-05)" in line
    assert "augment.label_smoothing (now 0; e.g. 0.1)" in line
    assert "smaller crop area data.rrc.scale (now [0.35, 1]" in line
    assert "more augmentation" in line


def test_train_accuracy_source():
    assert train_acc_source(cfg()) == "running"  # auto, no mixing
    assert train_acc_source(cfg("train.diagnose=clean")) == "clean"
    assert train_acc_source(cfg("train.diagnose=off")) == "off"
    # with batch mixing (augment.mixup) auto measures clean accuracy; other augmentations don't
    for mixed in ("augment.mixup.mixup_alpha=0.2", "augment.mixup.cutmix_alpha=1.0"):
        assert mixing_active(cfg(mixed)) and train_acc_source(cfg(mixed)) == "clean"
    assert not mixing_active(cfg("augment.cutout.enabled=true"))
    assert train_acc_source(cfg("augment.randaugment.enabled=true")) == "running"


@pytest.mark.parametrize("mode", ["running", "clean"])
def test_diagnosis_in_metrics_jsonl(tmp_path, capsys, mode):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
                 "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
                 "data.workers=0", "train.progress=false", f"train.out_dir={out}", "train.amp=off",
                 "train.epochs=1", f"train.diagnose={mode}"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["fit"] in ("healthy", "overfitting", "underfitting") and row["fit_source"] == mode
    assert row["fit_advice"].startswith(f"fit: {row['fit']}: train top-1 ")
    if mode == "running":
        assert row["fit_train_top1"] == row["train_top1"]
    else:  # every training image once, no augmentation: a multiple of 100/18
        assert (row["fit_train_top1"] * 18 / 100) == pytest.approx(round(row["fit_train_top1"] * 18 / 100))
    printed = capsys.readouterr().out
    assert printed.count("fit: ") == 1 and row["fit_advice"] in printed
