"""Fine-tuning from pretrained weights (the guide §9, docs/recipes.md).

- `load_pretrained`: `model.pretrained=PATH` -> weights into a freshly built model. PATH is
  a fastcls checkpoint (`last.pt`/`best.pt`: the state_dict under "model"), a torchvision
  or timm state_dict (`.pth`, or `.safetensors`), or a dict holding one under
  "state_dict"/"model". Tensors whose shape differs from the model's (the k×1000
  classifier of an ImageNet checkpoint, when fine-tuning to k classes) are skipped and
  reported; any other mismatch (missing or unknown keys, a backbone tensor of another
  shape) is an error, since it means the checkpoint is of another architecture.
- `set_backbone_frozen`: `model.freeze_epochs=N` trains only the classifier for the first N
  epochs (requires_grad False elsewhere; BatchNorm statistics keep updating, as in Paddle).
- `lr_warning`: the guide's LR for fine-tuning by dataset size, used by `--print-config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .config import Config, ConfigError, scaled_lr
from .models import classifier

_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)  # "key: file shape -> model shape"

    def __str__(self) -> str:
        msg = f"pretrained {self.path}: loaded {self.loaded} tensors"
        if self.skipped:
            msg += f", skipped {len(self.skipped)} with another shape (kept random init): " + \
                   "; ".join(self.skipped)
        return msg


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.pretrained: {str(path)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        try:  # weights_only: tensors and plain containers, nothing executable
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise ConfigError(f"model.pretrained: cannot read {str(path)!r} as a torch "
                              f"checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    state = unwrap_state_dict(state)
    if state is None:
        raise ConfigError(f"model.pretrained: {str(path)!r} holds no state_dict (a dict of tensors, "
                          f"or one under 'model' / 'state_dict')")
    return strip_prefixes(state)


STATE_KEYS = ("model", "state_dict", "model_state_dict")  # where fastcls / timm / others nest it


def unwrap_state_dict(obj) -> Optional[dict]:
    """The state_dict in a loaded file: the object itself or the dict under one of
    STATE_KEYS; None unless that is a non-empty dict of tensors."""
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    return obj


def strip_prefixes(state: dict) -> dict:
    """The state_dict with the DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes
    taken off its keys."""
    out = {}
    for k, v in state.items():
        for pre in _PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def classifier_keys(model: nn.Module, num_classes: int) -> set[str]:
    head = classifier(model, num_classes)
    for name, m in model.named_modules():
        if m is head:
            return {f"{name}.{k}" if name else k for k in m.state_dict()}
    return set()


def load_pretrained(model: nn.Module, path: str | Path, num_classes: int) -> LoadReport:
    """Copy the checkpoint's tensors into `model` (in place); see the module docstring."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_keys(model, num_classes)
    report = LoadReport(str(path))
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unknown = [k for k in state if k not in own]
    if missing or unknown:
        raise ConfigError(
            f"model.pretrained: {path} does not fit model {type(model).__name__} "
            f"({len(missing)} model keys missing from the file, e.g. {missing[:3]}; "
            f"{len(unknown)} file keys unknown to the model, e.g. {unknown[:3]}): "
            f"is model.name the checkpoint's architecture?")
    load = {}
    for k, v in state.items():
        if v.shape == own[k].shape:
            load[k] = v
        elif k in head:
            report.skipped.append(f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}")
        else:
            raise ConfigError(f"model.pretrained: {path}: {k} has shape {tuple(v.shape)}, the model "
                              f"{tuple(own[k].shape)}; only the classifier may differ")
    model.load_state_dict(load, strict=False)
    report.loaded = len(load)
    return report


def set_backbone_frozen(model: nn.Module, num_classes: int, frozen: bool) -> int:
    """requires_grad = not frozen for every parameter outside the classifier; returns how
    many parameter tensors changed state. Build the optimizer before freezing so that the
    frozen parameters are in it (skipped while their grad is None)."""
    head = {id(p) for p in classifier(model, num_classes).parameters()}
    n = 0
    for p in model.parameters():
        if id(p) not in head and p.requires_grad == frozen:
            p.requires_grad_(not frozen)
            n += 1
    return n


def suggested_finetune_lr(train_images: int) -> float:
    """The guide's fine-tuning LR at batch 256: 0.001 below 1k images, 0.01 above 100k,
    log-linear in between (the guide gives only the two ends)."""
    lo_n, hi_n, lo_lr, hi_lr = 1_000, 100_000, 0.001, 0.01
    if train_images <= lo_n:
        return lo_lr
    if train_images >= hi_n:
        return hi_lr
    t = math.log(train_images / lo_n) / math.log(hi_n / lo_n)
    return lo_lr * (hi_lr / lo_lr) ** t


LR_WARN_FACTOR = 5.0  # warn when the LR at batch 256 is more than this x the guide's value


def lr_warning(cfg: Config, train_images: Optional[int]) -> Optional[str]:
    """A warning when fine-tuning (`model.pretrained` set) with an LR the guide would call
    too large for the dataset size; None otherwise or when the size is unknown."""
    if not cfg.model.pretrained or not train_images:
        return None
    lr256 = scaled_lr(cfg.optim, 256) if cfg.optim.base_batch != 256 else cfg.optim.lr
    rec = suggested_finetune_lr(train_images)
    if lr256 <= LR_WARN_FACTOR * rec:
        return None
    return (f"fine-tuning {train_images} images with optim.lr={cfg.optim.lr:g} per "
            f"{cfg.optim.base_batch} (= {lr256:.3g} at batch 256) looks too large: the guide "
            f"suggests ~{rec:.2g} at batch 256 for this dataset size (0.001 below 1k images, "
            f"0.01 above 100k; the guide §9)")


def fill_momentum_buffers(optimizer: torch.optim.Optimizer) -> int:
    """Give every SGD parameter without a momentum buffer a zero one; returns how many.

    After a frozen phase only the classifier has buffers, and torch's fused SGD cannot
    step a mix of initialized and missing buffers. With dampening 0 a zero buffer gives
    exactly torch's first step (buf = grad), so this changes no result."""
    if not isinstance(optimizer, torch.optim.SGD):
        return 0
    n = 0
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("fill_momentum_buffers: exact only without dampening")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                n += 1
    return n
