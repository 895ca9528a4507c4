"""Schedules against torch.optim.lr_scheduler, stepped once per iteration."""
import math

import pytest
import torch

from fastcls.config import ScheduleConfig
from fastcls.schedule import build_schedule

SPE, EPOCHS, PEAK = 7, 12, 0.4


def torch_lrs(make, total):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=PEAK)
    sched = make(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def ours(cfg, total):
    lr_at = build_schedule(cfg, PEAK, SPE, EPOCHS)
    return [lr_at(s) for s in range(total)]


@pytest.mark.parametrize("warmup_epochs, start, final", [(0, 0.0, 0.0), (2, 0.1, 0.0), (3, 0.01, 0.05), (1.5, 0.25, 0.0)])
def test_warmup_cosine_matches_torch(warmup_epochs, start, final):
    cfg = ScheduleConfig(name="cosine", warmup_epochs=warmup_epochs, warmup_start_factor=start,
                         final_lr_factor=final)
    total, w = SPE * EPOCHS, round(warmup_epochs * SPE)

    def make(opt):
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - w, eta_min=PEAK * final)
        if w == 0:
            return cos
        lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start, total_iters=w)
        return torch.optim.lr_scheduler.SequentialLR(opt, [lin, cos], milestones=[w])
    assert ours(cfg, total) == pytest.approx(torch_lrs(make, total), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_warmup_piecewise_matches_torch(warmup_epochs):
    cfg = ScheduleConfig(name="piecewise", warmup_epochs=warmup_epochs, warmup_start_factor=0.1,
                         milestones=[4, 8, 10], gamma=0.1)
    total, w = SPE * EPOCHS, warmup_epochs * SPE

    def make(opt):
        # MultiStepLR counts from its own start, i.e. after the warmup.
        step = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[m * SPE - w for m in cfg.milestones], gamma=0.1)
        if w == 0:
            return step
        lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=w)
        return torch.optim.lr_scheduler.SequentialLR(opt, [lin, step], milestones=[w])
    assert ours(cfg, total) == pytest.approx(torch_lrs(make, total), rel=1e-9)


def test_warmup_from_zero_is_linear():
    # torch's LinearLR refuses start_factor=0, so check the guide's "from 0" directly.
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2)
    lrs = ours(cfg, 2 * SPE + 1)
    assert lrs[0] == 0.0
    assert lrs[SPE] == pytest.approx(PEAK / 2)
    assert lrs[2 * SPE] == pytest.approx(PEAK)
    assert all(b > a for a, b in zip(lrs, lrs[1:2 * SPE + 1]))


def test_per_iteration_not_per_epoch():
    lrs = ours(ScheduleConfig(name="cosine"), SPE * EPOCHS)
    assert len(set(lrs[:SPE])) == SPE  # changes within an epoch
    assert lrs[-1] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * (SPE * EPOCHS - 1) / (SPE * EPOCHS))))


# ---------------------------------------------------------------- polynomial, exponential

WARMUPS = [(0, 0.0), (2, 0.1), (1.5, 0.25)]


def _with_warmup(opt, after, w, start):
    if w == 0:
        return after
    lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start, total_iters=w)
    return torch.optim.lr_scheduler.SequentialLR(opt, [lin, after], milestones=[w])


@pytest.mark.parametrize("warmup_epochs, start", WARMUPS)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.9])
def test_polynomial_matches_torch(warmup_epochs, start, power):
    cfg = ScheduleConfig(name="polynomial", power=power, warmup_epochs=warmup_epochs,
                         warmup_start_factor=start)
    total, w = SPE * EPOCHS, round(warmup_epochs * SPE)

    def make(opt):
        poly = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total - w, power=power)
        return _with_warmup(opt, poly, w, start)
    assert ours(cfg, total) == pytest.approx(torch_lrs(make, total), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("final", [0.01, 0.2])
def test_polynomial_end_lr_matches_torch_plus_offset(final):
    # Paddle's PolynomialDecay(end_lr): (peak - end) * (1 - t/T)^p + end, i.e. torch's
    # PolynomialLR run on (peak - end), shifted by end.
    cfg = ScheduleConfig(name="polynomial", power=2.0, final_lr_factor=final)
    total, end = SPE * EPOCHS, PEAK * final
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=PEAK - end)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=2.0)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"] + end)
        opt.step()
        sched.step()
    assert ours(cfg, total) == pytest.approx(ref, rel=1e-9)
    assert ours(cfg, total + 5)[-1] == pytest.approx(end)  # clamps after the end


@pytest.mark.parametrize("warmup_epochs, start", WARMUPS)
@pytest.mark.parametrize("gamma", [0.97, 0.5])
def test_exponential_matches_torch(warmup_epochs, start, gamma):
    cfg = ScheduleConfig(name="exponential", exp_gamma=gamma, warmup_epochs=warmup_epochs,
                         warmup_start_factor=start)
    total, w = SPE * EPOCHS, round(warmup_epochs * SPE)

    def make(opt):  # gamma per epoch, applied every iteration: gamma ** (1/SPE) per step
        exp = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma ** (1 / SPE))
        return _with_warmup(opt, exp, w, start)
    got = ours(cfg, total)
    assert got == pytest.approx(torch_lrs(make, total), rel=1e-9, abs=1e-12)
    assert got[w + SPE] == pytest.approx(PEAK * gamma)  # one epoch after the warmup: x gamma


@pytest.mark.parametrize("name", ["cosine", "piecewise", "constant", "polynomial", "exponential"])
def test_every_schedule_warmup_boundary(name):
    cfg = ScheduleConfig(name=name, warmup_epochs=2, warmup_start_factor=0.1, milestones=[4, 8])
    lrs = ours(cfg, SPE * EPOCHS)
    w = 2 * SPE
    assert lrs[0] == pytest.approx(0.1 * PEAK)
    assert lrs[w - 1] == pytest.approx(PEAK * (0.1 + 0.9 * (w - 1) / w))
    assert lrs[w] == pytest.approx(PEAK)  # the decay starts from the peak right after warmup
    assert all(b >= a for a, b in zip(lrs[:w], lrs[1:w + 1]))
