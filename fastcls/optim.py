"""Parameter groups and the optimizer factory (the guide §1, §4, docs/recipes.md).

`optim.name` picks one of:

| name | implementation | weight decay (`optim.weight_decay`, alias `l2_decay`) |
|---|---|---|
| sgd | torch fused SGD (momentum, nesterov); apex FusedSGD with impl=apex | coupled L2: wd*w added to the gradient (as Paddle's `l2_decay` and torch SGD) |
| rmsprop | torch RMSprop (foreach) | coupled L2 |
| adam | torch fused Adam; apex FusedAdam with impl=apex | coupled L2 |
| adamw | torch fused AdamW; apex FusedAdam(adam_w_mode) with impl=apex | decoupled (Loshchilov & Hutter): w -= lr*wd*w |
| adadelta | torch Adadelta (foreach) | coupled L2 |
| lars | timm `Lars` (You et al. 2017, arXiv:1708.03888) | coupled L2, inside the trust ratio |
| lamb | timm `Lamb` (You et al. 2019, arXiv:1904.00962); apex FusedLAMB with impl=apex | decoupled, inside the trust ratio |

LARS and LAMB: parameters with ndim <= 1 (biases, norm affine weights, found by structure)
get neither weight decay nor the layer-wise trust ratio, always, as in both papers'
reference implementations. Both timm and apex skip the trust ratio exactly for the groups
whose weight_decay is 0, so that group split is what excludes them.

`optim.impl`: `auto` uses apex's fused kernels when `apex.optimizers` imports and the
model is on CUDA, else torch's; `apex` requires apex; `torch` never uses it.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn

from .config import OPTIMIZERS, ConfigError, OptimConfig

# Trust-ratio optimizers always exclude norm/bias from decay and adaptation.
TRUST_RATIO = ("lars", "lamb")
# Which names apex accelerates (apex.optimizers class); the rest always use torch/timm.
_APEX = {"sgd": "FusedSGD", "adam": "FusedAdam", "adamw": "FusedAdam", "lamb": "FusedLAMB"}


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Split by structure, not by name (as timm and nanoGPT do): params with ndim <= 1 are the
    biases and the norm layers' affine weights, wherever they sit in the model."""
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def apex_available() -> bool:
    try:
        return importlib.util.find_spec("apex") is not None and \
            importlib.util.find_spec("apex.optimizers") is not None
    except ModuleNotFoundError:
        return False


def use_apex(cfg: OptimConfig, on_cuda: bool) -> bool:
    """Whether build_optimizer takes apex's kernel for this config (raises if impl=apex can't)."""
    if cfg.impl == "torch" or cfg.name not in _APEX:
        if cfg.impl == "apex" and cfg.name not in _APEX:
            raise ConfigError(f"optim.impl=apex: apex has no fused {cfg.name}; apex covers "
                              f"{', '.join(_APEX)} (use optim.impl=auto)")
        return False
    if cfg.impl == "apex":
        if not apex_available():
            raise ConfigError("optim.impl=apex: apex is not importable (install NVIDIA apex with its "
                              "CUDA extensions, or set optim.impl=auto)")
        if not on_cuda:
            raise ConfigError("optim.impl=apex: apex's fused optimizers need the model on CUDA")
        return True
    return on_cuda and apex_available()


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """`lr` is the effective (already scaled) peak LR; the schedule overwrites it per step.

    Params that do not require grad at build time are left out; params frozen later
    (model.freeze_epochs) stay in and are skipped while their grad is None."""
    name = cfg.name
    groups = param_groups(model, cfg.weight_decay,
                          cfg.no_decay_norm_bias or name in TRUST_RATIO)
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and params[0].is_cuda
    if use_apex(cfg, on_cuda):
        return _build_apex(cfg, groups, lr)
    wd = cfg.weight_decay
    # fused=True: one multi-tensor kernel for all params (CUDA and CPU); needs float params.
    fused = all(p.is_floating_point() for p in params)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=wd, fused=fused)
    if name == "rmsprop":
        # no fused RMSprop in torch; foreach (multi-tensor) is its fastest path.
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps or 1e-8,
                                   momentum=cfg.momentum, weight_decay=wd, foreach=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps or 1e-8,
                                weight_decay=wd, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps or 1e-8,
                                 weight_decay=wd, fused=fused)
    if name == "adadelta":
        # lr is a multiplier of the unit-free Adadelta step (torch default 1.0).
        return torch.optim.Adadelta(groups, lr=lr, rho=cfg.rho, eps=cfg.eps or 1e-6,
                                    weight_decay=wd, foreach=True)
    if name == "lars":
        from timm.optim import Lars  # torch ships no LARS; timm's is maintained and tested
        return Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd,
                    trust_coeff=cfg.trust_coeff, eps=cfg.eps or 1e-8)
    if name == "lamb":
        from timm.optim import Lamb  # torch ships no LAMB
        # max_grad_norm=None: no global-norm clipping hidden inside the optimizer (timm's
        # default clips at 1.0; the LAMB paper does not).
        return Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps or 1e-6, weight_decay=wd,
                    max_grad_norm=None)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


def _build_apex(cfg: OptimConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """apex.optimizers (CUDA only). Not exercised on this project's CPU CI."""
    import apex.optimizers as ao

    wd = cfg.weight_decay
    if cfg.name == "sgd":
        return ao.FusedSGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=wd)
    if cfg.name in ("adam", "adamw"):
        return ao.FusedAdam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps or 1e-8, weight_decay=wd,
                            adam_w_mode=cfg.name == "adamw")
    if cfg.name == "lamb":
        # apex clips the global grad norm at max_grad_norm (default 1.0); a bound no real
        # gradient reaches turns that off, matching the timm path (max_grad_norm=None).
        return ao.FusedLAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.eps or 1e-6, weight_decay=wd,
                            max_grad_norm=1e30)
    raise ValueError(f"apex has no fused {cfg.name}")
