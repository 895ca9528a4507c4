"""Fit diagnosis (the guide §8): the reading's standard-error rule against a hand computation,
the ceiling and size rules, the verdict's hysteresis and provisional phase on crafted
readings, and real runs on scikit-learn's handwritten digits that end overfitting (100
training images) and underfitting (over-regularized)."""
import json

import pytest

from fastcls.config import load_config
from fastcls.diagnose import PROVISIONAL, FitTracker, diagnose, early_reason, gap_se, mixing_active, read_fit, train_acc_source
from fastcls.train import main

from conftest import assert_verdict_stable, digits_folder, make_folder


def cfg(*overrides):
    return load_config("pipelines/resnet50_bs256.yaml", list(overrides))


# ---------------------------------------------------------------- one evaluation's reading

def test_standard_error_by_hand():
    # train 82% of 1000 images, val 75% of 400:
    #   se_train = 100 sqrt(0.82 * 0.18 / 1000) = 100 sqrt(1.476e-4)   = 1.21491
    #   se_val   = 100 sqrt(0.75 * 0.25 / 400)  = 100 sqrt(4.6875e-4)  = 2.16506
    #   se_gap   = sqrt(1.21491^2 + 2.16506^2)  = sqrt(1.476 + 4.6875) = 2.48264
    assert gap_se(82.0, 1000, 75.0, 400) == pytest.approx(2.48264, abs=1e-5)
    # gap 7 > diagnose_overfit_gap 5 and > 2 x 2.48264 = 4.965: overfitting
    r = read_fit(82.0, 1000, 75.0, 400, cfg())
    assert (r.verdict, r.why, r.gap) == ("overfitting", "gap", pytest.approx(7.0))
    # the same accuracies on 100 val images: se_val = 100 sqrt(0.1875 / 100) = 4.33013,
    # se_gap = sqrt(1.476 + 18.75) = 4.49733, 2 se = 8.995 > 7: within noise
    assert gap_se(82.0, 1000, 75.0, 100) == pytest.approx(4.49733, abs=1e-5)
    r = read_fit(82.0, 1000, 75.0, 100, cfg())
    assert (r.verdict, r.why) == ("healthy", "within noise")
    line = FitTracker(cfg()).update(1, r, None, final=True).line
    assert line.startswith("fit (final): healthy: train top-1 82.00% (running, 1000 images) vs val 75.00% "
                           "(100 images): gap +7.00 +/- 8.99. within noise: +/- 8.99 points at 100 val images")
    # underfitting needs the same. val 73% above train 70% of 1000 and 400 images:
    #   se = sqrt(100^2 (0.7 * 0.3 / 1000 + 0.73 * 0.27 / 400)) = sqrt(2.1 + 4.9275) = 2.651,
    #   |gap| 3 > diagnose_underfit_gap 1 but < 2 se = 5.30: within noise
    assert gap_se(70.0, 1000, 73.0, 400) == pytest.approx(2.65094, abs=1e-5)
    r = read_fit(70.0, 1000, 73.0, 400, cfg())
    assert (r.verdict, r.why) == ("healthy", "within noise")
    # on 10000 images each: se = sqrt(0.21 + 0.1971) = 0.63804, 2 se = 1.276 < 3: underfitting
    assert gap_se(70.0, 10000, 73.0, 10000) == pytest.approx(0.63804, abs=1e-5)
    r = read_fit(70.0, 10000, 73.0, 10000, cfg())
    assert (r.verdict, r.why) == ("underfitting", "gap")


@pytest.mark.parametrize("train, val, verdict", [
    (78.0, 77.5, "healthy"),          # slightly above
    (77.0, 77.0, "healthy"),          # equal
    (76.5, 77.2, "healthy"),          # below by less than diagnose_underfit_gap (1.0)
    (82.6, 77.5, "overfitting"),      # gap 5.1 > 5.0 (2 se at ImageNet's sizes: 0.39)
    (99.0, 60.0, "overfitting"),
    (43.79, 50.41, "underfitting"),   # the guide's MobileNetV1_x0_25, l2_decay 1e-4
    (75.13, 77.65, "underfitting"),   # the guide's ResNet50 + RandAugment, l2_decay 1e-4
])
def test_the_guides_verdicts_at_imagenet_sizes(train, val, verdict):
    assert diagnose(train, val, cfg()).verdict == verdict


def test_thresholds_are_knobs():
    assert diagnose(80.0, 77.0, cfg()).verdict == "healthy"
    assert diagnose(80.0, 77.0, cfg("train.diagnose_overfit_gap=2")).verdict == "overfitting"
    assert diagnose(76.5, 77.2, cfg("train.diagnose_underfit_gap=0.5")).verdict == "underfitting"


def test_no_advice_at_the_ceiling():
    # the demo's case: train 98.54% (960 images) vs val 100% (200): gap -1.46 > 1 and > 2 se
    # (se = 100 sqrt(0.9854 0.0146 / 960) = 0.387), yet nothing is left to fix
    r = read_fit(98.54, 960, 100.0, 200, cfg())
    assert (r.verdict, r.why) == ("healthy", "at the ceiling")
    # within 2 standard errors of 100%: 98.5% of 200 (se 0.86, 2 se 1.72 >= 1.5 points left)
    assert read_fit(95.0, 960, 98.5, 200, cfg()).why == "at the ceiling"
    # 97% of 200 (2 se = 2.41 < 3 points left) is not: val far above train is underfitting
    assert read_fit(90.0, 960, 97.0, 200, cfg()).verdict == "underfitting"
    line = FitTracker(cfg()).update(30, r, None, final=True).line
    assert line.startswith("fit (final): healthy: ") and "nothing to fix" in line
    assert "weight_decay" not in line


def test_sizes_that_differ_are_not_blamed_on_regularization():
    # progressive resizing at 32 px against val at 72 px: gap +31, resolution not capacity
    c = cfg("data.image_size=72")
    r = read_fit(90.0, 5000, 59.0, 1000, c, "running", train_size=32, val_size=72)
    assert (r.verdict, r.why) == ("not comparable", "sizes differ")
    line = FitTracker(c).update(10, r, None, final=True).line
    assert "32 px" in line and "72 px" in line and "train.diagnose=clean" in line
    assert "regularization:" not in line
    # a clean pass measures the training images at the val size: like with like
    assert read_fit(90.0, 5000, 59.0, 1000, c, "clean", train_size=32, val_size=72).verdict == "overfitting"


def test_underfitting_names_knobs_with_current_values():
    c = cfg("optim.l2_decay=1e-4", "augment.label_smoothing=0.1")
    line = FitTracker(c).update(90, diagnose(43.79, 50.41, c), None, final=True).line
    assert line.startswith("fit (final): underfitting: train top-1 43.79% (running, 1281167 images) vs "
                           "val 50.41% (50000 images): gap -6.62 +/- 0.46.")
    assert "lower optim.weight_decay (l2_decay, now 0.0001" in line
    assert "larger crop area data.rrc.scale (now [0.08, 1]" in line
    assert "weaker stretch data.rrc.ratio (now [0.75, 1.3333]" in line
    assert "no label smoothing augment.label_smoothing (now 0.1" in line
    # knobs already at their weakest are not suggested
    weak = cfg("optim.weight_decay=0", "data.rrc.scale=[0.5,1.0]", "data.rrc.ratio=[0.9,1.1]")
    line = FitTracker(weak).update(90, diagnose(43.79, 50.41, weak), None, final=True).line
    assert "weight_decay" not in line and "rrc" not in line and "label_smoothing" not in line
    assert "larger model or more epochs" in line


def test_overfitting_names_knobs_with_current_values():
    c = cfg("optim.weight_decay=3e-5", "data.rrc.scale=[0.35,1.0]")
    line = FitTracker(c).update(90, diagnose(95.0, 70.0, c), None, final=True).line
    assert "fit (final): overfitting" in line and "more regularization" in line
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


# ---------------------------------------------------------------- the verdict over a run

def _r(c, train, val, n_train=1000, n_val=1000):
    return read_fit(train, n_train, val, n_val, c)


def test_verdict_changes_only_after_patience_and_waits_for_the_early_phase():
    c = cfg()
    h, o = (75.0, 74.0), (90.0, 74.0)  # healthy (gap +1) and overfitting (gap +16 >> 2 se 3.6)
    t = FitTracker(c)
    seq = [t.update(1, _r(c, *o), "LR warmup", False),            # early: withheld
           t.update(2, _r(c, *h), "LR at 90% of its peak", False)]
    assert [d.verdict for d in seq] == [PROVISIONAL] * 2
    assert seq[0].line.startswith("fit: provisional (LR warmup; the guide reads end-of-training "
                                  "accuracies): reads overfitting (gap): ")
    assert "regularization" not in seq[0].line  # no advice while provisional
    got = [t.update(e, _r(c, *x), None, False).verdict
           for e, x in zip(range(3, 11), (h, h, o, h, o, o, o, h))]
    # 3: the last 3 readings are o, h, h: none stated yet; 4: h, h, h; a single o (5) or
    # two in a row (8, 9) do not change it, three in a row (10... needs 8, 9, 10) would
    assert got == [PROVISIONAL, "healthy", "healthy", "healthy", "healthy", "healthy", "overfitting",
                   "overfitting"]
    line = t.update(11, _r(c, *h), None, False).line
    assert line.startswith("fit: overfitting (this evaluation reads healthy: 2 of 3 in a row to change): ")
    # the final evaluation: the stated verdict, the trend of the gap over the last 5
    final = t.update(12, _r(c, *o), None, True)
    assert final.verdict == "overfitting" and final.final
    assert [e for e, _ in final.trend] == [8, 9, 10, 11, 12]
    assert final.as_record()["fit_final"] == "overfitting"
    assert "trend of the gap over the last 5 evaluations: +16.00, +16.00, +1.00, +1.00, +16.00 (flat)" \
        in final.line


def test_final_verdict_without_a_statement_is_the_last_reading_and_the_trend_says_where_it_goes():
    c = cfg()
    t = FitTracker(c)
    t.update(1, _r(c, 75.0, 74.0), "LR warmup", False)
    final = t.update(2, _r(c, 88.0, 74.0), None, True)  # a 2-evaluation run: no 3 in a row
    assert final.verdict == "overfitting"
    assert "(rising: train pulling away from val)" in final.line


def test_tracker_state_survives_a_resume():
    c = cfg()
    t, rows = FitTracker(c), []
    for e, x in enumerate([(75.0, 74.0)] * 3 + [(90.0, 74.0)] * 2, start=1):
        rows.append({"epoch": e, **t.update(e, _r(c, *x), None, False).as_record()})
    back = FitTracker.from_rows(c, rows + [{"epoch": 6, **rows[-1]}], upto_epoch=5)  # 6: not yet
    assert back.stated == t.stated == "healthy" and back.history == t.history
    # one more overfitting reading changes both the same way
    assert back.update(6, _r(c, 90.0, 74.0), None, False).verdict == \
        t.update(6, _r(c, 90.0, 74.0), None, False).verdict == "overfitting"


def test_early_phase_rule():
    c = cfg("train.epochs=90", "schedule.name=piecewise", "schedule.milestones=[30,60]",
            "schedule.warmup_epochs=5")
    spe, peak = 100, 0.1
    assert early_reason(c, 2, 300, spe, 0.06, peak) == "LR warmup"
    assert early_reason(c, 10, 1100, spe, 0.1, peak) == "LR at 100% of its peak"
    assert early_reason(c, 30, 3100, spe, 0.01, peak) is None  # after the first decay
    assert early_reason(c, 89, 9000, spe, 0.1, peak) is None  # the last epoch: never early
    p = cfg("train.epochs=10", "data.progressive.start_size=128", "data.progressive.end_size=192",
            "data.progressive.start_epoch=2", "data.progressive.end_epoch=6", "data.image_size=192")
    assert "training size still ramps" in early_reason(p, 3, 400, spe, 0.01, peak)
    f = cfg("train.epochs=10", "model.freeze_epochs=2")
    assert "backbone frozen" in early_reason(f, 1, 200, spe, 0.01, peak)


def test_ema_runs_say_which_weights():
    c = cfg()
    line = FitTracker(c).update(1, _r(c, 75.0, 74.0), None, True, ema_val_top1=76.5).line
    assert "(live weights; the EMA's val top-1 76.50% is not diagnosed)" in line


# ---------------------------------------------------------------- real runs

@pytest.mark.parametrize("mode", ["running", "clean"])
def test_diagnosis_in_metrics_jsonl(tmp_path, capsys, mode):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
                 "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
                 "data.workers=0", "train.progress=false", f"train.out_dir={out}", "train.amp=off",
                 "train.epochs=1", f"train.diagnose={mode}"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["fit"] == row["fit_final"] == row["fit_reading"]  # one evaluation: its reading
    assert row["fit"] in ("healthy", "overfitting", "underfitting") and row["fit_source"] == mode
    assert row["fit_advice"].startswith(f"fit (final): {row['fit']}: train top-1 ")
    assert row["fit_val_images"] == row["val_images"] == 18 and row["fit_weights"] == "model"
    assert row["fit_se"] == pytest.approx(gap_se(row["fit_train_top1"], row["fit_train_images"],
                                                 row["val_top1"], 18))
    if mode == "running":
        assert row["fit_train_top1"] == row["train_top1"] and row["fit_train_images"] == 16  # 4 steps of 4
    else:  # every training image once, no augmentation: a multiple of 100/18
        assert row["fit_train_images"] == 18
        assert (row["fit_train_top1"] * 18 / 100) == pytest.approx(round(row["fit_train_top1"] * 18 / 100))
    printed = capsys.readouterr().out
    assert printed.count("fit (final): ") == 1 and row["fit_advice"] in printed
    assert f"| fit: {row['fit']} (gap " in printed


def _digits_run(tmp_path, train_idx, val_idx, *extra):
    """resnet_tiny on scikit-learn's handwritten digits (32 px PNGs), fp32, in this process."""
    data = tmp_path / "digits"
    digits_folder(data / "train", train_idx)
    digits_folder(data / "val", val_idx)
    out = tmp_path / "run"
    assert main(["pipelines/demo.yaml", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
                 "data.image_size=32", "data.val_resize=32", "data.workers=0", "train.amp=off",
                 "train.progress=false", f"train.out_dir={out}", *extra]) == 0
    return out


def test_a_100_image_training_set_ends_overfitting(tmp_path, capsys):
    """100 training digits (about 10 per class), no augmentation, no weight decay: the model
    learns its training images (running top-1 -> 100%) far better than 400 others."""
    out = _digits_run(tmp_path, range(100), range(1000, 1400), "train.epochs=16", "data.batch_size=20",
                      "data.rrc.scale=[1.0,1.0]", "data.rrc.ratio=[1.0,1.0]", "data.hflip=0",
                      "optim.weight_decay=0")
    seq = assert_verdict_stable(out, max_changes=1, final="overfitting")
    print(seq)
    assert "raise optim.weight_decay" in capsys.readouterr().out


def test_an_over_regularized_run_ends_underfitting(tmp_path, capsys):
    """Strong augmentation (crops down to 8% of a digit, stretch 1:3, flips, RandAugment),
    label smoothing and 100x the demo's weight decay: the running top-1 on the augmented
    images stays far below the val top-1 on clean ones."""
    out = _digits_run(tmp_path, range(600), range(1000, 1400), "train.epochs=10", "data.batch_size=50",
                      "data.rrc.scale=[0.08,1.0]", "data.rrc.ratio=[0.33,3.0]", "data.hflip=0.5",
                      "augment.randaugment.enabled=true", "augment.label_smoothing=0.3",
                      "optim.weight_decay=5e-3")
    seq = assert_verdict_stable(out, max_changes=1, final="underfitting")
    print(seq)
    assert "lower optim.weight_decay" in capsys.readouterr().out
