"""A checkpoint for inference: its model, classes and val transform, for fastcls.eval,
fastcls.predict and fastcls.export (one loader, so the three read a checkpoint the same way).

    loaded = load_checkpoint("runs/demo/best.pt", ["data.val=/d/val"], ema=False)
    model = build_inference_model(loaded, device)     # eval mode, the weights loaded strictly

A CHECKPOINT is either
- a fastcls checkpoint (`last.pt`/`best.pt`, digest-checked against its `.sha256`): its saved
  config gives the model, the classes and the val transform; `section.key=value` overrides
  apply on top (another `data.val`, backend, resolution, `train.amp`, ...); `ema=True` takes
  the EMA weights (the checkpoint's `ema` entry) instead of `model`;
- a plain torchvision/timm state_dict (`.pth`/`.pt`/`.safetensors`, or a dict holding one under
  `state_dict`/`model`/`model_state_dict`): there is no config, so the overrides must name the
  architecture (`model.name=resnet50`, and `model.num_classes` when not 1000); the rest is the
  schema's defaults (224 px crop of a 256 px resize: torchvision's ImageNet evaluation) with
  data.batch_size 64.

Errors a user can fix are one-line `InferenceError`s (missing/corrupt file, an architecture
that does not fit the weights, no EMA weights); config errors stay `ConfigError`s.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .atomic import WriteError
from .config import Config, ConfigError, apply_overrides, config_from_dict
from .data.base import MEAN, STD, val_image_size
from .finetune import STATE_KEYS, strip_prefixes, unwrap_state_dict
from .models import build_model

PLAIN_BATCH = 64  # data.batch_size for a plain state_dict unless overridden
# `section.key=value` (an override) rather than a path, for the commands that take both
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


class InferenceError(ValueError):
    """A checkpoint or input the user must fix; the message is one line naming it."""


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read for inference. `weights`: the state_dict to load (model or EMA);
    `classes`: the class names (None for a plain state_dict: the val folder's, or indices)."""
    path: str
    cfg: Config
    weights: dict
    classes: Optional[list[str]]
    ema: bool

    def class_names(self) -> list[str]:
        """One name per model output: the checkpoint's classes, else the output index."""
        names = list(self.classes or [])
        return names + [str(i) for i in range(len(names), self.cfg.model.num_classes)]


def is_override(text: str) -> bool:
    return bool(OVERRIDE.match(text)) and not os.path.exists(text)


def _read(path: Path):
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InferenceError(f"{path}: reading .safetensors needs safetensors: "
                                 f"pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
            raise InferenceError(f"{path}: cannot be read as safetensors ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from None
    try:
        return ckpt.load_any(path)
    except ckpt.CheckpointError as e:
        raise InferenceError(str(e)) from None


def _plain_state_dict(obj, path: Path) -> dict:
    state = unwrap_state_dict(obj)  # as model.pretrained reads one
    if state is None:
        raise InferenceError(f"{path}: neither a fastcls checkpoint nor a state_dict (a dict of "
                             f"tensors, or one under {' / '.join(STATE_KEYS)})")
    return state


def load_checkpoint(path: str | os.PathLike, overrides: Sequence[str] = (), *, ema: bool = False,
                    notes: Optional[list[str]] = None) -> Loaded:
    """Read CHECKPOINT (see the module docstring) with `overrides` applied to its config."""
    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"checkpoint {str(path)!r} does not exist")
    obj = _read(p)
    if ckpt.is_fastcls_state(obj):
        tree = obj.get("config")
        if not isinstance(tree, dict):
            raise InferenceError(f"{p}: fastcls checkpoint without its config")
        tree = apply_overrides(copy.deepcopy(tree), overrides, notes)
        tree.pop("resolved", None)
        cfg = config_from_dict(tree, f"{p} (its config)" + (" + overrides" if overrides else ""))
        if ema:
            weights = obj.get("ema")
            if not isinstance(weights, dict) or not weights:
                raise InferenceError(f"{p}: --ema asked for, but the checkpoint has no EMA weights "
                                     f"(trained without train.ema); drop --ema to use its model")
        else:
            weights = obj["model"]
        return Loaded(str(p), cfg, strip_prefixes(weights), list(obj["classes"]), ema)
    if ema:
        raise InferenceError(f"{p}: --ema needs a fastcls checkpoint with an 'ema' entry; this is a "
                             f"plain state_dict")
    weights = _plain_state_dict(obj, p)
    if not any(o.split("=", 1)[0].strip() == "model.name" for o in overrides):
        raise InferenceError(f"{p} is a plain state_dict (no fastcls config): name its architecture "
                             f"with model.name=... (and model.num_classes=... when not 1000)")
    # the schema's defaults, but a batch size (which the schema leaves to the recipe)
    tree = apply_overrides({"data": {"batch_size": PLAIN_BATCH}}, overrides, notes)
    cfg = config_from_dict(tree, "<defaults> + overrides")
    return Loaded(str(p), cfg, strip_prefixes(weights), None, False)


def checkpoint_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser the three commands share: `prog CHECKPOINT ...`."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fastcls checkpoint (best.pt, last.pt) or a "
                                      "torchvision/timm state_dict (with model.name=...)")
    return p


def build_inference_model(loaded: Loaded, device: torch.device) -> nn.Module:
    """`loaded.cfg.model` built and `loaded.weights` loaded into it (every key and shape
    must match; BatchNorm's num_batches_tracked may be absent), on `device`, channels_last
    per the config, in eval mode. InferenceError names what does not fit."""
    from .finetune import classifier_keys
    cfg = loaded.cfg
    try:
        # blurpool changes the forward, not the keys: build what was trained
        model = build_model(cfg.model.name, cfg.model.num_classes, blurpool=cfg.model.blurpool)
    except ValueError as e:  # an unknown timm name
        raise InferenceError(f"model.name: {e}") from None
    own, w = model.state_dict(), loaded.weights
    missing = [k for k in own if k not in w and not k.endswith("num_batches_tracked")]
    unknown = [k for k in w if k not in own]
    shapes = [f"{k}: {tuple(w[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in w if k in own and w[k].shape != own[k].shape]
    head = classifier_keys(model, cfg.model.num_classes)
    if not missing and not unknown and shapes and all(s.split(":")[0] in head for s in shapes):
        outputs = next(w[k].shape[0] for k in head if k in w and w[k].ndim >= 1)
        raise InferenceError(f"{loaded.path}: model.num_classes={cfg.model.num_classes} but the "
                             f"checkpoint's classifier has {outputs} outputs; set "
                             f"model.num_classes={outputs}")
    if missing or unknown or shapes:
        parts = [f"{len(missing)} model keys missing from the file (e.g. {missing[:3]})" if missing else "",
                 f"{len(unknown)} file keys unknown to the model (e.g. {unknown[:3]})" if unknown else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else ""]
        raise InferenceError(f"{loaded.path} does not fit model.name={cfg.model.name!r}: "
                             f"{', '.join(x for x in parts if x)}; is model.name the checkpoint's "
                             f"architecture?")
    model.load_state_dict(w, strict=False)  # strict but for num_batches_tracked (checked above)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def preprocessing(cfg: Config) -> dict:
    """The val transform as a plain description (export sidecars, docs): RGB, shorter side
    resized to `resize` (bilinear), center crop `crop`, x / 255, (x - mean) / std per channel,
    float32 NCHW."""
    return {"resize_shorter_side": cfg.data.val_resize, "center_crop": val_image_size(cfg.data),
            "interpolation": "bilinear", "color": "RGB", "scale": "pixel / 255",
            "mean": [round(m / 255, 6) for m in MEAN], "std": [round(s / 255, 6) for s in STD],
            "layout": "NCHW", "dtype": "float32"}


# Shown with every command's error: what a user can fix, as one line (exit status 2).
USER_ERRORS = (InferenceError, ConfigError, ckpt.CheckpointError, WriteError)
