"""Fit diagnosis after each evaluation (the guide §8, docs/recipes.md): healthy / overfitting / underfitting.

The guide reads train vs val top-1: train slightly above or equal to val is healthy;
train >> val is overfitting (more regularization: raise l2_decay, more augmentation,
label smoothing); train < val is underfitting (less regularization: lower l2_decay, fewer
augmentations, larger crop area, weaker stretch, no label smoothing). `diagnose()` is a
pure function of the two accuracies and the config; thresholds are
`train.diagnose_overfit_gap` and `train.diagnose_underfit_gap` (percentage points).

Which train accuracy (`train.diagnose`):
- `running`: the epoch's running top-1 on the augmented training batches. This is what
  the guide's tables report (e.g. MobileNetV1_x0_25: train 43.79 < test 50.41 with
  l2_decay 1e-4, "underfitting", fixed by 3e-5), so its verdicts apply unchanged. Free.
- `clean`: an extra pass over the training images with the validation transform (resize
  + center crop, no augmentation, eval mode) after each evaluation. Needed when
  batch-mixing augmentations (mixup/cutmix) make the running accuracy (against the
  dominant label of a mixed image) meaningless. Costs one forward pass over the train
  set per evaluation (about a third of a training epoch).
- `auto` (default): `clean` when mixup or cutmix is on, else `running`.
- `off`: no diagnosis.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import Config

VERDICTS = ("healthy", "overfitting", "underfitting")


@dataclass(frozen=True)
class Diagnosis:
    verdict: str        # one of VERDICTS
    train_top1: float   # %, the accuracy the verdict used
    val_top1: float     # %
    source: str         # "running" | "clean"
    line: str           # the one line printed after the evaluation

    def as_record(self) -> dict:
        """Keys added to the metrics.jsonl record."""
        return {"fit": self.verdict, "fit_train_top1": self.train_top1,
                "fit_source": self.source, "fit_advice": self.line}


def mixing_active(cfg: Config) -> bool:
    """Mixup/CutMix on? (augment.mixup with either alpha > 0, or a cutmix_minmax box range)."""
    mix = cfg.augment.mixup
    return mix.mixup_alpha > 0 or mix.cutmix_alpha > 0 or mix.cutmix_minmax is not None


def train_acc_source(cfg: Config) -> str:
    """'running', 'clean' or 'off' for this config (resolves `auto`)."""
    mode = cfg.train.diagnose
    if mode == "auto":
        return "clean" if mixing_active(cfg) else "running"
    return mode


def enabled_augmentations(cfg: Config) -> list[str]:
    """Names of the enabled `augment.*` sub-sections (whatever the schema holds)."""
    out = []
    for f in dataclasses.fields(cfg.augment):
        v: Any = getattr(cfg.augment, f.name)
        if not dataclasses.is_dataclass(v):
            continue
        if getattr(v, "enabled", False):
            out.append(f.name)
        elif f.name == "mixup" and mixing_active(cfg):
            out.append("mixup/cutmix")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _sug(v: float) -> str:
    """A suggested value, rounded to 2 significant digits (3.3e-05, not 3.33333e-05)."""
    return f"{v:.2g}"


def diagnose(train_top1: float, val_top1: float, cfg: Config, source: str = "running") -> Diagnosis:
    """Verdict and the guide's knobs with their current values, as one line."""
    gap = train_top1 - val_top1
    o, d, a = cfg.optim, cfg.data, cfg.augment
    wd, ls = o.weight_decay, a.label_smoothing
    augs = enabled_augmentations(cfg)
    head = f"train top-1 {train_top1:.2f}% ({source}) vs val {val_top1:.2f}% (gap {gap:+.2f})"
    if gap > cfg.train.diagnose_overfit_gap:
        verdict = "overfitting"
        knobs = [f"raise optim.weight_decay (l2_decay, now {_fmt(wd)}; e.g. {_sug(wd * 2 or 1e-4)})"]
        if ls < 0.1:
            knobs.append(f"augment.label_smoothing (now {_fmt(ls)}; e.g. 0.1)")
        knobs.append("more augmentation (augment.*; enabled now: " + (", ".join(augs) or "none") + ")")
        if d.rrc.scale[0] > 0.08:
            knobs.append(f"smaller crop area data.rrc.scale (now {_fmt(d.rrc.scale)}; e.g. [0.08, 1.0])")
        advice = "more regularization: " + "; ".join(knobs)
    elif -gap > cfg.train.diagnose_underfit_gap:
        verdict = "underfitting"
        knobs = []
        if wd > 0:
            knobs.append(f"lower optim.weight_decay (l2_decay, now {_fmt(wd)}; e.g. {_sug(wd / 3)})")
        if augs:
            knobs.append("fewer augmentations (enabled now: " + ", ".join(augs) + ")")
        if d.rrc.scale[0] < 0.35:
            knobs.append(f"larger crop area data.rrc.scale (now {_fmt(d.rrc.scale)}; "
                         f"e.g. [{_sug(min(0.35, d.rrc.scale[0] * 2.5))}, 1.0])")
        if d.rrc.ratio[0] < 0.8 or d.rrc.ratio[1] > 1.25:
            knobs.append(f"weaker stretch data.rrc.ratio (now {_fmt(d.rrc.ratio)}; e.g. [0.8, 1.25])")
        if ls > 0:
            knobs.append(f"no label smoothing augment.label_smoothing (now {_fmt(ls)}; e.g. 0)")
        if not knobs:
            knobs.append("regularization is already minimal: a larger model or more epochs "
                         f"(train.epochs now {cfg.train.epochs})")
        advice = "less regularization: " + "; ".join(knobs)
    else:
        verdict = "healthy"
        advice = "train slightly above or equal to val: keep the regularization"
    return Diagnosis(verdict, train_top1, val_top1, source, f"fit: {verdict}: {head}. {advice}")
