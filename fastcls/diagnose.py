"""Fit diagnosis after each evaluation (the guide §8, docs/recipes.md): healthy / overfitting /
underfitting, with the knobs to turn.

The guide reads train vs val top-1 at the end of training: train slightly above or equal to
val is healthy; train >> val is overfitting (more regularization: raise l2_decay, more
augmentation, label smoothing); train < val is underfitting (less regularization: lower
l2_decay, fewer augmentations, larger crop area, weaker stretch, no label smoothing).

Each evaluation gives a *reading* (`read_fit`, a pure function of the numbers and the config):
- the gap (train - val, points) counts only when it exceeds its threshold
  (`train.diagnose_overfit_gap` / `train.diagnose_underfit_gap`) AND `SIGMAS` standard errors
  of the difference (`gap_se`: the binomial standard errors of the two accuracies from the
  images each was measured on); otherwise the reading is healthy, "within noise";
- at the ceiling (val within max(1 point, 2 standard errors) of 100%) it is healthy: nothing
  to fix;
- a running train accuracy on images of another size than val's (data.progressive,
  data.val_image_size) is "not comparable": the gap is resolution, not fit.

The *verdict* (`FitTracker`) is what is printed and recorded as `fit`: "provisional" (none
stated yet) until an evaluation outside the early phase (`early_reason`: backbone frozen,
LR warmup, data.progressive still ramping, LR above half its peak; the guide compares
end-of-training accuracies) finds the same reading in the last `PATIENCE` evaluations;
after that it changes only when another reading holds for `PATIENCE` evaluations in a row
(hysteresis). The last evaluation gives the final verdict (`fit_final`: the stated one,
else that evaluation's reading) with the trend of the gap over the last `TREND`.

Which train accuracy (`train.diagnose`):
- `running`: the epoch's running top-1 on the augmented training batches. This is what
  the guide's tables report (e.g. MobileNetV1_x0_25: train 43.79 < test 50.41 with
  l2_decay 1e-4, "underfitting", fixed by 3e-5), so its verdicts apply unchanged. Free.
- `clean`: an extra pass over the training images with the validation transform (resize
  + center crop at the val size, no augmentation, eval mode) after each evaluation. Needed
  when batch-mixing augmentations (mixup/cutmix) make the running accuracy (against the
  dominant label of a mixed image) meaningless, and like with like when the sizes differ.
  Costs one forward pass over the train set per evaluation (about a third of an epoch).
- `auto` (default): `clean` when mixup or cutmix is on, else `running`.
- `off`: no diagnosis.
The verdict is about the live model's weights (with train.ema, the EMA's val top-1 is shown
beside it, not diagnosed).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .config import Config
from .data.base import train_image_size, val_image_size

VERDICTS = ("healthy", "overfitting", "underfitting", "not comparable")
PROVISIONAL = "provisional"
SIGMAS = 2.0      # a gap counts when it exceeds this many standard errors of the difference
PATIENCE = 3      # evaluations in a row a reading must hold to be stated (or to change the verdict)
TREND = 5         # evaluations the final trend covers
CEILING_MIN = 1.0  # points below 100% that count as the ceiling at least


def binomial_se(top1: float, n: int) -> float:
    """Standard error (points) of an accuracy `top1` (%) measured on `n` images:
    100 * sqrt(p (1 - p) / n)."""
    p = min(max(top1 / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(n, 1))


def gap_se(train_top1: float, n_train: int, val_top1: float, n_val: int) -> float:
    """Standard error (points) of train_top1 - val_top1, the two measured on independent
    images: sqrt(se_train^2 + se_val^2)."""
    return math.hypot(binomial_se(train_top1, n_train), binomial_se(val_top1, n_val))


@dataclass(frozen=True)
class Reading:
    """One evaluation's reading. `verdict` in VERDICTS; `why`: "gap", "within noise",
    "within thresholds", "at the ceiling" or "sizes differ"."""
    verdict: str
    why: str
    train_top1: float
    n_train: int
    val_top1: float
    n_val: int
    gap: float          # train - val, points
    se: float           # standard error of the gap, points
    source: str         # "running" | "clean"
    train_size: int     # px
    val_size: int       # px

    def numbers(self) -> str:
        return (f"train top-1 {self.train_top1:.2f}% ({self.source}, {self.n_train} images"
                + (f", {self.train_size} px" if self.train_size != self.val_size else "")
                + f") vs val {self.val_top1:.2f}% ({self.n_val} images"
                + (f", {self.val_size} px" if self.train_size != self.val_size else "")
                + f"): gap {self.gap:+.2f} +/- {SIGMAS * self.se:.2f}")


def read_fit(train_top1: float, n_train: int, val_top1: float, n_val: int, cfg: Config,
             source: str = "running", train_size: Optional[int] = None,
             val_size: Optional[int] = None) -> Reading:
    """The reading of one evaluation (module docstring). Sizes default to the config's."""
    vsize = val_size or val_image_size(cfg.data)
    tsize = vsize if source == "clean" else (train_size or cfg.data.image_size)
    gap = train_top1 - val_top1
    se = gap_se(train_top1, n_train, val_top1, n_val)
    args = (train_top1, n_train, val_top1, n_val, gap, se, source, tsize, vsize)
    if tsize != vsize:
        return Reading("not comparable", "sizes differ", *args)
    if 100.0 - val_top1 <= max(CEILING_MIN, SIGMAS * binomial_se(val_top1, n_val)):
        return Reading("healthy", "at the ceiling", *args)
    if gap > cfg.train.diagnose_overfit_gap:
        verdict = "overfitting"
    elif -gap > cfg.train.diagnose_underfit_gap:
        verdict = "underfitting"
    else:
        return Reading("healthy", "within thresholds", *args)
    if abs(gap) <= SIGMAS * se:
        return Reading("healthy", "within noise", *args)
    return Reading(verdict, "gap", *args)


def early_reason(cfg: Config, epoch: int, step: int, steps_per_epoch: int, lr: float,
                 peak_lr: float) -> Optional[str]:
    """Why an evaluation after `epoch` (from 0; `step` optimizer steps done, LR `lr` at the
    last of them) is too early for a verdict, or None. The guide compares end-of-training
    accuracies: while the backbone is frozen, the LR warms up or stays above half its peak
    (the weights still move fast: the running train accuracy lags them and val swings by
    many points between epochs), or the training size still ramps, a reading is shown but
    not stated. The last epoch is never early."""
    if epoch + 1 >= cfg.train.epochs:
        return None
    if epoch < cfg.model.freeze_epochs:
        return f"backbone frozen until epoch {cfg.model.freeze_epochs + 1} (model.freeze_epochs)"
    if step <= round(cfg.schedule.warmup_epochs * steps_per_epoch):
        return "LR warmup"
    size, final = train_image_size(cfg.data, epoch), train_image_size(cfg.data, cfg.train.epochs - 1)
    if size != final:
        return f"training size still ramps (data.progressive: {size} of {final} px)"
    if peak_lr > 0 and lr > 0.5 * peak_lr:
        return f"LR at {100 * lr / peak_lr:.0f}% of its peak"
    return None


# ------------------------------------------------------------------ advice

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


def advice(r: Reading, cfg: Config) -> str:
    """The guide's knobs for a reading, with their current values."""
    o, d, a = cfg.optim, cfg.data, cfg.augment
    wd, ls = o.weight_decay, a.label_smoothing
    augs = enabled_augmentations(cfg)
    if r.verdict == "overfitting":
        knobs = [f"raise optim.weight_decay (l2_decay, now {_fmt(wd)}; e.g. {_sug(wd * 2 or 1e-4)})"]
        if ls < 0.1:
            knobs.append(f"augment.label_smoothing (now {_fmt(ls)}; e.g. 0.1)")
        knobs.append("more augmentation (augment.*; enabled now: " + (", ".join(augs) or "none") + ")")
        if d.rrc.scale[0] > 0.08:
            knobs.append(f"smaller crop area data.rrc.scale (now {_fmt(d.rrc.scale)}; e.g. [0.08, 1.0])")
        return "more regularization: " + "; ".join(knobs)
    if r.verdict == "underfitting":
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
        return "less regularization: " + "; ".join(knobs)
    if r.verdict == "not comparable":
        return (f"the training images are {r.train_size} px, val's {r.val_size} px: the gap mixes "
                f"resolution with fit, so no regularization advice; train.diagnose=clean measures "
                f"the training images at the val size (one extra pass per evaluation)")
    if r.why == "at the ceiling":
        return f"val top-1 is at the ceiling ({r.n_val} val images): nothing to fix"
    if r.why == "within noise":
        return (f"within noise: +/- {SIGMAS * r.se:.2f} points at {r.n_val} val images "
                f"and {r.n_train} train images; keep the regularization")
    return "train slightly above or equal to val: keep the regularization"


def diagnose(train_top1: float, val_top1: float, cfg: Config, source: str = "running", *,
             n_train: int = 1_281_167, n_val: int = 50_000) -> Reading:
    """`read_fit` with ImageNet-1k's image counts as defaults (the guide's tables)."""
    return read_fit(train_top1, n_train, val_top1, n_val, cfg, source)


# ------------------------------------------------------------------ the verdict over a run

@dataclass(frozen=True)
class Diagnosis:
    """What one evaluation prints and records."""
    verdict: str                 # the stated verdict (VERDICTS) or PROVISIONAL
    reading: Reading
    early: Optional[str]         # why the evaluation is too early for a verdict, or None
    line: str                    # the line printed after the evaluation
    final: bool = False
    trend: tuple = ()            # final: ((epoch, gap), ...) of the last TREND evaluations
    trend_word: str = ""         # final: "rising" | "falling" | "flat"

    def as_record(self) -> dict:
        """Keys added to the metrics.jsonl record: what the verdict was made of."""
        r = self.reading
        rec = {"fit": self.verdict, "fit_reading": r.verdict, "fit_why": r.why,
               "fit_train_top1": r.train_top1, "fit_train_images": r.n_train,
               "fit_val_top1": r.val_top1, "fit_val_images": r.n_val, "fit_gap": r.gap,
               "fit_se": r.se, "fit_source": r.source, "fit_weights": "model",
               "fit_train_size": r.train_size, "fit_val_size": r.val_size,
               "fit_early": self.early, "fit_advice": self.line}
        if self.final:
            rec.update(fit_final=self.verdict, fit_trend=[list(t) for t in self.trend],
                       fit_trend_direction=self.trend_word)
        return rec


# metrics.jsonl keys printed on the fit line instead of the summary line
QUIET_KEYS = ("fit_reading", "fit_why", "fit_train_top1", "fit_train_images", "fit_val_top1",
              "fit_val_images", "fit_gap", "fit_se", "fit_source", "fit_weights",
              "fit_train_size", "fit_val_size", "fit_early", "fit_advice", "fit_final",
              "fit_trend", "fit_trend_direction")


class FitTracker:
    """The verdict over a run's evaluations (module docstring): feed each evaluation's
    reading to `update`; `from_rows` rebuilds the state from metrics.jsonl on resume."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.history: list[tuple[int, str, float, float]] = []  # (epoch, reading, gap, se)
        self.stated: Optional[str] = None

    @classmethod
    def from_rows(cls, cfg: Config, rows: Sequence[dict], upto_epoch: int) -> "FitTracker":
        """The tracker after the recorded evaluations of epochs <= upto_epoch (the last
        record of each epoch: a run resumed from an older checkpoint appends again)."""
        t = cls(cfg)
        by_epoch = {r["epoch"]: r for r in rows if "fit_reading" in r and r["epoch"] <= upto_epoch}
        for e in sorted(by_epoch):
            r = by_epoch[e]
            t.history.append((e, r["fit_reading"], r["fit_gap"], r["fit_se"]))
            t.stated = r["fit"] if r["fit"] in VERDICTS else t.stated
        return t

    def update(self, epoch: int, reading: Reading, early: Optional[str], final: bool,
               ema_val_top1: Optional[float] = None) -> Diagnosis:
        """The diagnosis of the evaluation after `epoch` (counted from 1)."""
        self.history.append((epoch, reading.verdict, reading.gap, reading.se))
        last = [h[1] for h in self.history[-PATIENCE:]]
        agree = len(set(last)) == 1
        if early is None and agree and (len(last) == PATIENCE or final):
            self.stated = reading.verdict
        verdict = self.stated or (reading.verdict if final else PROVISIONAL)
        ema = "" if ema_val_top1 is None else \
            f" (live weights; the EMA's val top-1 {ema_val_top1:.2f}% is not diagnosed)"
        numbers = reading.numbers() + ema
        if early is not None or verdict == PROVISIONAL:
            why = early or ("the last readings differ: " + ", ".join(last)
                            if not agree else f"{len(last)} of {PATIENCE} readings so far")
            line = (f"fit: provisional ({why}; the guide reads end-of-training accuracies): "
                    f"reads {reading.verdict} ({reading.why}): {numbers}")
            return Diagnosis(PROVISIONAL, reading, early, line)
        note = ""
        if reading.verdict != verdict:
            run = 0
            for h in reversed(self.history):
                if h[1] != reading.verdict:
                    break
                run += 1
            note = f" (this evaluation reads {reading.verdict}: {run} of {PATIENCE} in a row to change)"
        shown = reading if reading.verdict == verdict else dataclasses.replace(
            reading, verdict=verdict, why="gap" if verdict in ("overfitting", "underfitting") else reading.why)
        head = "fit (final)" if final else "fit"
        line = f"{head}: {verdict}{note}: {numbers}. {advice(shown, self.cfg)}"
        if not final:
            return Diagnosis(verdict, reading, None, line)
        trend = tuple((e, round(g, 2)) for e, _, g, _ in self.history[-TREND:])
        word = "flat"
        if len(trend) > 1:
            delta = trend[-1][1] - trend[0][1]
            if abs(delta) > SIGMAS * reading.se:
                word = "rising" if delta > 0 else "falling"
        gaps = ", ".join(f"{g:+.2f}" for _, g in trend)
        line += (f" | trend of the gap over the last {len(trend)} evaluations: {gaps} ({word}"
                 + {"rising": ": train pulling away from val", "falling": ": val catching up",
                    "flat": ""}[word] + ")")
        return Diagnosis(verdict, reading, None, line, True, trend, word)
