"""Every optimizer steps a tiny model; torch-backed ones equal torch's reference
implementation with the same arguments; LARS/LAMB equal the papers' update rules written
out below (trust ratio per tensor, norm/bias excluded)."""
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from fastcls.config import OPTIMIZERS, ConfigError, OptimConfig, load_config, scaled_lr
from fastcls.optim import build_optimizer, param_groups, use_apex

ROOT_PIPE = "pipelines/demo.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    # no bias before the BN: its gradient is ~0 and Adam would amplify rounding noise
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


LRS = {"sgd": 0.1, "rmsprop": 0.003, "adam": 0.01, "adamw": 0.01, "adadelta": 1.0,
       "lars": 1.0, "lamb": 0.02}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_a_tiny_model(name):
    model = tiny()
    opt = build_optimizer(OptimConfig(name=name, weight_decay=1e-4), model, LRS[name])
    losses = _run(model, opt, 30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], (name, losses[0], losses[-1])


def _run(model, opt, steps=4, xy=None):
    """`steps` full-batch steps on `xy` (default: data()) -> the loss before each step
    (collected on the device: no host sync in the loop)."""
    x, y = data() if xy is None else xy
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


@pytest.mark.parametrize("name, ref", [
    ("adam", lambda g, lr: torch.optim.Adam(g, lr=lr, betas=(0.8, 0.99), eps=1e-7, foreach=False)),
    ("adamw", lambda g, lr: torch.optim.AdamW(g, lr=lr, betas=(0.8, 0.99), eps=1e-7, foreach=False)),
    ("rmsprop", lambda g, lr: torch.optim.RMSprop(g, lr=lr, alpha=0.9, eps=1e-7, momentum=0.9,
                                                  foreach=False)),
    ("adadelta", lambda g, lr: torch.optim.Adadelta(g, lr=lr, rho=0.95, eps=1e-7, foreach=False)),
    ("sgd", lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9, nesterov=True, foreach=False)),
])
def test_torch_optimizers_pass_every_knob(name, ref):
    cfg = OptimConfig(name=name, betas=(0.8, 0.99), eps=1e-7, alpha=0.9, rho=0.95, momentum=0.9,
                      nesterov=name == "sgd", weight_decay=1e-2, no_decay_norm_bias=True)
    m1, m2 = tiny(), tiny()
    opt1 = build_optimizer(cfg, m1, 0.01)
    opt2 = ref(param_groups(m2, 1e-2, True), 0.01)
    _run(m1, opt1)
    _run(m2, opt2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_decay_is_decoupled_adam_is_coupled():
    # One step from zero gradient: Adam's L2 term goes through the adaptive normalization
    # (a step of ~lr whatever wd), AdamW shrinks the weight by lr*wd exactly.
    for name, expect in (("adamw", lambda w, lr, wd: w * (1 - lr * wd)),
                         ("adam", lambda w, lr, wd: w - lr * torch.sign(w))):
        p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        model = nn.Module()
        model.p = p
        opt = build_optimizer(OptimConfig(name=name, weight_decay=0.1), model, 0.01)
        w0 = p.detach().clone()
        p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(p.detach(), expect(w0, 0.01, 0.1), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- LARS / LAMB references

def lars_reference(params, grads_per_step, lr, momentum, wd, eta, eps):
    """You et al. 2017, Algorithm 1, per tensor; ndim<=1 tensors: plain momentum SGD, no wd."""
    ws = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(w) for w in ws]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(ws, grads)):
            if w.ndim > 1:
                local = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
                d = local * (g + wd * w)
            else:
                d = g
            bufs[i] = momentum * bufs[i] + d
            ws[i] = w - lr * bufs[i]
    return ws


def lamb_reference(params, grads_per_step, lr, b1, b2, eps, wd):
    """You et al. 2019, Algorithm 2 (phi = identity), per tensor; ndim<=1: Adam, no wd."""
    ws = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (w, g) in enumerate(zip(ws, grads)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            r = (ms[i] / (1 - b1 ** t)) / ((vs[i] / (1 - b2 ** t)).sqrt() + eps)
            if w.ndim > 1:
                u = r + wd * w
                ws[i] = w - lr * (w.norm() / u.norm()) * u
            else:
                ws[i] = w - lr * r
    return ws


def _fixed_grads(model, steps, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.1 + i)
             for i, p in enumerate(model.parameters())] for _ in range(steps)]


def _apply(model, opt, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()


@contextmanager
def float64_default():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def _assert_matches_reference(cfg, lr, steps, reference, **ref_args):
    """`cfg`'s optimizer at `lr`, fed `steps` fixed gradients (float64), leaves the weights
    `reference(params, grads, lr=lr, **ref_args)` computes."""
    with float64_default():
        model = tiny()
        grads = _fixed_grads(model, steps)
        ref = reference(list(model.parameters()), grads, lr=lr, **ref_args)
        _apply(model, build_optimizer(cfg, model, lr), grads)
    for got, want in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("no_decay_norm_bias", [False, True])  # lars/lamb exclude them either way
def test_lars_matches_paper_update(no_decay_norm_bias):
    cfg = OptimConfig(name="lars", momentum=0.9, weight_decay=5e-4, trust_coeff=0.002, eps=1e-9,
                      no_decay_norm_bias=no_decay_norm_bias)
    _assert_matches_reference(cfg, 0.5, 4, lars_reference, momentum=0.9, wd=5e-4, eta=0.002,
                              eps=1e-9)


def test_lamb_matches_paper_update():
    cfg = OptimConfig(name="lamb", betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    _assert_matches_reference(cfg, 0.01, 5, lamb_reference, b1=0.9, b2=0.99, eps=1e-6, wd=0.05)


def test_trust_ratio_really_differs_from_plain_update():
    # Guards the references above: without the trust ratio the result would differ.
    with float64_default():
        model = tiny()
        grads = _fixed_grads(model, 2)
        ref = lars_reference(list(model.parameters()), grads, 0.5, 0.9, 5e-4, 0.002, 1e-9)
        plain = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        _apply(model, plain, grads)
    assert not torch.allclose(next(model.parameters()).detach(), ref[0])


# ---------------------------------------------------------------- config knobs

def test_l2_decay_alias(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  l2_decay: 3e-5\ndata:\n  batch_size: 8\n")
    assert load_config(p).optim.weight_decay == 3e-5
    assert load_config(p, ["optim.l2_decay=1e-4"]).optim.weight_decay == 1e-4
    assert load_config(p, ["optim.weight_decay=7e-5"]).optim.weight_decay == 7e-5
    p.write_text("optim:\n  l2_decay: 3e-5\n  weight_decay: 1e-4\ndata:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match="l2_decay is an alias of optim.weight_decay"):
        load_config(p)


@pytest.mark.parametrize("name, rule", [("sgd", "linear"), ("lars", "linear"), ("adam", "sqrt"),
                                        ("adamw", "sqrt"), ("rmsprop", "sqrt"),
                                        ("adadelta", "sqrt"), ("lamb", "sqrt")])
def test_auto_lr_scaling(name, rule):
    cfg = OptimConfig(name=name, lr=0.1, base_batch=256)  # lr_scaling defaults to auto
    assert scaled_lr(cfg, 4096) == pytest.approx(0.1 * (16 if rule == "linear" else 4))


def test_apex_selection_without_apex():
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex installed here")
    except ImportError:
        pass
    assert use_apex(OptimConfig(name="lamb"), on_cuda=True) is False   # auto: torch/timm
    with pytest.raises(ConfigError, match="apex is not importable"):
        use_apex(OptimConfig(name="lamb", impl="apex"), on_cuda=True)
    with pytest.raises(ConfigError, match="apex has no fused rmsprop"):
        use_apex(OptimConfig(name="rmsprop", impl="apex"), on_cuda=True)
    opt = build_optimizer(OptimConfig(name="sgd"), tiny(), 0.1)
    assert opt.defaults["fused"] is True  # the fused torch path stays the CPU/CUDA default


@pytest.mark.parametrize("override, needle", [
    ("optim.betas=[0.9,1.0]", "optim.betas[1]: must be in [0, 1)"),
    ("optim.impl=cuda", "optim.impl: unknown name 'cuda'"),
    ("optim.name=lion", "valid choices: sgd, rmsprop, adam, adamw, adadelta, lars, lamb"),
])
def test_optim_config_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT_PIPE, [override])
    assert needle in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_on_cuda(name):
    """CUDA params: torch fused kernels (or apex's when importable, optim.impl=auto)."""
    from fastcls.optim import _APEX, apex_available
    model = tiny().cuda()
    opt = build_optimizer(OptimConfig(name=name, weight_decay=1e-4), model, LRS[name])
    if apex_available() and name in _APEX:
        assert type(opt).__module__.startswith("apex.")
    losses = _run(model, opt, 30, [t.cuda() for t in data()])
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0]
