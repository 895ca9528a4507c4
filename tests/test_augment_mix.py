"""Mixup/CutMix against timm's `Mixup` fed the same random draws, label smoothing against
nn.CrossEntropyLoss, off epoch, odd batches, the trainer path end to end."""
import json

import numpy as np
import pytest
import torch
from timm.data import Mixup

from fastcls import checkpoint
from fastcls.augment import build_augmenter, dominant_label
from fastcls.augment.mix import MixDraws, apply_mix, boxes_and_lam, expand_to_batch, mixup_cutmix
from fastcls.config import load_config
from fastcls.loss import SmoothedCrossEntropy

from conftest import make_folder

C = 7


class Recorder:
    """Wraps np.random.{rand,beta,randint} (what timm's Mixup draws from) and records results."""

    def __init__(self, monkeypatch):
        self.calls = {"rand": [], "beta": [], "randint": []}
        for name in self.calls:
            orig = getattr(np.random, name)

            def wrapped(*a, _orig=orig, _name=name, **k):
                out = _orig(*a, **k)
                self.calls[_name].append(out)
                return out
            monkeypatch.setattr(np.random, name, wrapped)


def batch(n=8, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g), torch.randint(0, C, (n,), generator=g)


def ours_from_timm_draws(x, y, rec, mode, kw, smoothing):
    """Rebuild timm's decisions from the recorded draws and run our vectorized path."""
    n, _, h, w = x.shape
    both = kw.get("mixup_alpha", 1.0) > 0 and kw.get("cutmix_alpha", 0.0) > 0
    minmax = kw.get("cutmix_minmax")
    prob, switch = kw.get("prob", 1.0), kw.get("switch_prob", 0.5)
    if mode == "batch":
        rs = [float(v) for v in rec.calls["rand"]]
        apply = torch.tensor([rs[0] < prob])
        use_cut = torch.tensor([both and rs[1] < switch]) if both else \
            torch.tensor([kw.get("mixup_alpha", 1.0) == 0])
        lam = torch.tensor([float(rec.calls["beta"][0])], dtype=torch.float64) if apply else torch.ones(1, dtype=torch.float64)
        k = 1
    else:
        k = n if mode == "elem" else n // 2
        rs = rec.calls["rand"]
        use_cut = torch.from_numpy(rs[0] < switch) if both else torch.zeros(k, dtype=torch.bool)
        apply = torch.from_numpy(rs[-1] < prob)
        b = rec.calls["beta"]
        lam_mix = np.where(use_cut.numpy(), b[0], b[1]) if both else b[0]
        lam = torch.where(apply, torch.from_numpy(lam_mix.astype(np.float32)).double(), torch.ones(k, dtype=torch.float64))
    ints = [int(np.asarray(v).reshape(-1)[0]) for v in rec.calls["randint"]]
    cy = torch.zeros(k, dtype=torch.long)
    cx = torch.zeros(k, dtype=torch.long)
    ch = torch.zeros(k, dtype=torch.long)
    cw = torch.zeros(k, dtype=torch.long)
    j = 0
    for i in range(k):
        if use_cut[i] and lam[i] != 1.0:
            if minmax:
                ch[i], cw[i], cy[i], cx[i] = ints[j:j + 4]
                j += 4
            else:
                cy[i], cx[i] = ints[j:j + 2]
                j += 2
    assert j == len(ints)
    d = MixDraws(apply, use_cut, lam, cy, cx, ch, cw)
    boxes, lam_c = boxes_and_lam(d, h, w, kw.get("correct_lam", True), minmax is not None)
    lam_n = expand_to_batch(lam_c, n, mode, 1.0)
    cut_n = expand_to_batch(d.use_cutmix & (d.lam < 1.0), n, mode, False)
    return apply_mix(x, y, C, smoothing, lam_n, cut_n, expand_to_batch(boxes, n, mode, 0))


CASES = [
    ("batch", dict(mixup_alpha=0.2, cutmix_alpha=0.0)),
    ("batch", dict(mixup_alpha=0.0, cutmix_alpha=1.0)),
    ("batch", dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)),
    ("batch", dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False)),
    ("batch", dict(mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=(0.2, 0.7))),
    ("elem", dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7)),
    ("pair", dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8)),
    ("elem", dict(mixup_alpha=0.4, cutmix_alpha=0.0)),
]


@pytest.mark.parametrize("mode,kw", CASES)
@pytest.mark.parametrize("seed", range(6))
def test_matches_timm_on_same_draws(monkeypatch, mode, kw, seed):
    x, y = batch(seed=seed)
    smoothing = 0.1
    np.random.seed(seed)
    rec = Recorder(monkeypatch)
    ref = Mixup(mode=mode, label_smoothing=smoothing, num_classes=C, **kw)
    xr, tr = ref(x.clone(), y.clone())
    monkeypatch.undo()
    xo, to = ours_from_timm_draws(x, y, rec, mode, kw, smoothing)
    torch.testing.assert_close(xo, xr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(to, tr.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_targets_sum_to_one_and_mixing_happens(mode):
    x, y = batch(n=16)
    g = torch.Generator().manual_seed(0)
    xo, t = mixup_cutmix(x, y, g, num_classes=C, mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode,
                         label_smoothing=0.1)
    assert t.shape == (16, C) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(16))
    assert (t.min() >= 0.1 / C - 1e-6) and not torch.equal(xo, x)
    # the stream is the generator's: same seed, same result; another seed, another one
    xo2, _ = mixup_cutmix(x, y, torch.Generator().manual_seed(0), num_classes=C, mixup_alpha=0.8,
                          cutmix_alpha=1.0, mode=mode, label_smoothing=0.1)
    assert torch.equal(xo, xo2)


def test_beta_draws_follow_the_distribution():
    from fastcls.augment.mix import sample_beta
    s = sample_beta(0.2, 200_000, torch.Generator().manual_seed(0), "cpu").numpy()
    ref = np.random.default_rng(0).beta(0.2, 0.2, 200_000)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(np.quantile(s, q) - np.quantile(ref, q)) < 0.01


def test_odd_batch_middle_sample_stays_itself():
    x, y = batch(n=7)
    for mode in ("batch", "pair", "elem"):
        xo, t = mixup_cutmix(x, y, torch.Generator().manual_seed(1), num_classes=C, mixup_alpha=1.0,
                             cutmix_alpha=1.0, mode=mode)
        torch.testing.assert_close(xo[3], x[3])
        assert t[3].argmax() == y[3] and t[3].max() == 1.0


def test_label_smoothing_without_mixing_matches_torch():
    """Mixing off: the augmenter hands int labels to the loss = nn.CrossEntropyLoss(label_smoothing);
    mixing on with prob 0: the folded soft targets give the same loss."""
    cfg = load_config(None, ["data.batch_size=8", "augment.label_smoothing=0.1"]).augment
    aug = build_augmenter(cfg, C)
    x, y = batch()
    logits = torch.randn(8, C)
    xo, t = aug(x, y, epoch=0, step=0)
    assert t is y and xo is x
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y)
    crit = SmoothedCrossEntropy(C, 0.1)
    torch.testing.assert_close(crit(logits, t), ref)
    _, soft = mixup_cutmix(x, y, torch.Generator(), num_classes=C, mixup_alpha=1.0, prob=0.0,
                           label_smoothing=0.1)
    torch.testing.assert_close(crit(logits, soft), ref)
    torch.testing.assert_close(dominant_label(soft), y)


def test_off_epoch_and_generator_keys():
    cfg = load_config(None, ["data.batch_size=8", "augment.mixup.mixup_alpha=0.2",
                             "augment.mixup.off_epoch=3"]).augment
    aug = build_augmenter(cfg, C, seed=1, rank=0)
    x, y = batch()
    assert aug(x, y, 2, 10)[1].dim() == 2
    assert aug(x, y, 3, 10)[1] is y          # off from epoch 3 on: int labels again
    a = aug(x, y, 1, 5)[0]
    assert torch.equal(a, aug(x, y, 1, 5)[0])          # same (epoch, step): same stream (resume)
    assert not torch.equal(a, aug(x, y, 1, 6)[0])      # next step: another draw
    other_rank = build_augmenter(cfg, C, seed=1, rank=1)
    assert not torch.equal(a, other_rank(x, y, 1, 5)[0])


def test_trainer_end_to_end_and_resume_repeats_the_augmented_stream(tmp_path):
    """The trainer with every augmentation on (mixup+cutmix in pair mode, label smoothing, the
    uint8 policies, the erasing family) trains and evaluates; interrupted after epoch 1 and
    resumed it ends with the same weights as uninterrupted: the augmentation stream is a
    function of (seed, rank, epoch, step)."""
    from fastcls.train import main
    data = make_folder(tmp_path / "data")

    def run(out, *extra):
        return main(["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
                     "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
                     "data.workers=0", "train.progress=false", f"train.out_dir={out}", "train.amp=off",
                     "augment.mixup.mixup_alpha=0.4", "augment.mixup.cutmix_alpha=1.0", "augment.mixup.mode=pair",
                     "augment.label_smoothing=0.1", "augment.randaugment.enabled=true",
                     "augment.autoaugment.enabled=true", "augment.random_erasing.enabled=true",
                     "augment.cutout.enabled=true", "augment.cutout.length=16", "augment.gridmask.enabled=true",
                     "augment.gridmask.d1=8", "augment.gridmask.d2=24", "augment.hide_and_seek.enabled=true",
                     "augment.hide_and_seek.grid_sizes=[0,8,16]", *extra])
    assert run(tmp_path / "a", "train.epochs=2") == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["train_top1"] <= 100 for r in rows)
    assert run(tmp_path / "b", "train.epochs=1") == 0
    assert run(tmp_path / "b", "train.epochs=2", "train.resume=auto") == 0
    sa, sb = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-5, atol=1e-6)
