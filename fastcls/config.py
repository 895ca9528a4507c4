"""Typed configuration: YAML recipe + dotted command-line overrides -> frozen dataclasses.

    cfg = load_config("pipelines/demo.yaml", ["optim.lr=0.2", "data.rrc.scale=[0.35,1.0]"])

Rules (STYLE.md §3): unknown keys, wrong types and invalid values raise `ConfigError`
naming the file, the dotted key and the valid choices. YAML reads `5e-5` as a string, so
values are coerced by the dataclass field's type. Batch-size-dependent values are written
per reference batch (`optim.lr` is the LR for `optim.base_batch` images) and scaled once,
in `resolve()`, to the global batch.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# Names picked in YAML. Registries live next to their implementations; these tuples are
# the single source of valid names so that config validation needs no heavy imports.
BACKENDS = ("native", "synthetic", "dali", "ffcv")
OPTIMIZERS = ("sgd",)
SCHEDULES = ("cosine", "piecewise", "constant")
LR_SCALING = ("linear", "sqrt", "none")
AMP_MODES = ("bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the key and what is valid."""


# --------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class RRCConfig:
    scale: tuple[float, float] = (0.08, 1.0)   # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h (sampled in log space)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    num_classes: int = 1000
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class FFCVConfig:
    """data.backend=ffcv only (fastcls/data/ffcv_loader.py)."""
    order: str = "random"       # random | quasi_random (single process; datasets > RAM)
    os_cache: bool = True       # page cache (shared by ranks) vs FFCV's own process cache
    batches_ahead: int = 3      # batches decoded ahead of the training step


@dataclass(frozen=True)
class DataConfig:
    backend: str = "native"
    train: str = ""                       # ImageFolder root: train/<class>/*.jpg
    val: str = ""
    demo: bool = False                    # generate + use the embedded demo dataset
    batch_size: Optional[int] = None      # per process; or ...
    global_batch_size: Optional[int] = None  # ... over all processes (must divide)
    image_size: int = 224
    val_resize: int = 256                 # shorter side before the center crop
    rrc: RRCConfig = field(default_factory=RRCConfig)
    hflip: float = 0.5                    # probability of a horizontal flip
    workers: int = 8                      # DataLoader worker processes per rank
    pin_memory: bool = True
    max_bad_fraction: float = 0.01        # undecodable files tolerated per epoch, else fail
    synthetic_images: int = 12800         # epoch length of the synthetic backend
    ffcv: FFCVConfig = field(default_factory=FFCVConfig)


@dataclass(frozen=True)
class AugmentConfig:
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1                 # LR for base_batch images; scaled to the global batch
    base_batch: int = 256
    lr_scaling: str = "linear"      # linear (Goyal et al. 2017) | sqrt | none
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4      # coupled L2 (torch SGD), Paddle's l2_decay
    no_decay_norm_bias: bool = False  # exclude params with ndim <= 1 from weight decay


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.0  # warmup starts at this fraction of the peak LR
    final_lr_factor: float = 0.0      # cosine ends at this fraction of the peak LR
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # epochs (piecewise)
    gamma: float = 0.1                # piecewise decay factor per milestone


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 90
    amp: str = "bf16"
    device: str = "auto"
    out_dir: str = ""                 # default: runs/<recipe name>
    resume: str = ""                  # "" | auto | PATH to a checkpoint
    seed: int = 0
    eval_every: int = 1               # epochs
    log_every: int = 50               # steps; the only host<->device syncs in the loop
    progress: bool = True             # tqdm bar on rank 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"                 # recipe name, from the file name


# --------------------------------------------------------------------------- building

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f == int(f):
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as false/true
            return "on" if value else "off"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"unsupported config type {tp} for {key}")  # a schema bug, not a user error


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"'{prefix}'" if prefix else "the top level"
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix + '.' if prefix else ''}{k}'.{hint} "
                          f"Valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}: unknown name {value!r}; valid choices: {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Range and name checks that the types alone cannot express."""
    from .models import model_names  # lazy: keeps `--print-config` errors cheap

    d, o, s, t = cfg.data, cfg.optim, cfg.schedule, cfg.train
    _choice("data.backend", d.backend, BACKENDS)
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("optim.lr_scaling", o.lr_scaling, LR_SCALING)
    _choice("schedule.name", s.name, SCHEDULES)
    _choice("train.amp", t.amp, AMP_MODES)
    _choice("train.device", t.device, DEVICES)
    names = model_names()
    if cfg.model.name not in names:
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; valid choices: "
                          f"{', '.join(names)}")

    def positive(key: str, v: float, allow_zero: bool = False) -> None:
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    def fraction(key: str, v: float) -> None:
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {v}")

    positive("model.num_classes", cfg.model.num_classes)
    if (d.batch_size is None) == (d.global_batch_size is None):
        raise ConfigError("data: set exactly one of data.batch_size (per process) or "
                          "data.global_batch_size (divided over the processes)")
    if d.batch_size is not None:
        positive("data.batch_size", d.batch_size)
    if d.global_batch_size is not None:
        positive("data.global_batch_size", d.global_batch_size)
    positive("data.image_size", d.image_size)
    positive("data.val_resize", d.val_resize)
    if d.val_resize < d.image_size:
        raise ConfigError(f"data.val_resize ({d.val_resize}) must be >= data.image_size "
                          f"({d.image_size}): validation center-crops image_size")
    lo, hi = d.rrc.scale
    if not (0 < lo <= hi <= 1):
        raise ConfigError(f"data.rrc.scale: must satisfy 0 < min <= max <= 1, got [{lo}, {hi}]")
    lo, hi = d.rrc.ratio
    if not (0 < lo <= hi):
        raise ConfigError(f"data.rrc.ratio: must satisfy 0 < min <= max, got [{lo}, {hi}]")
    fraction("data.hflip", d.hflip)
    positive("data.workers", d.workers, allow_zero=True)
    fraction("data.max_bad_fraction", d.max_bad_fraction)
    positive("data.synthetic_images", d.synthetic_images)
    _choice("data.ffcv.order", d.ffcv.order, ("random", "quasi_random"))
    positive("data.ffcv.batches_ahead", d.ffcv.batches_ahead)
    fraction("augment.label_smoothing", cfg.augment.label_smoothing)
    positive("optim.lr", o.lr)
    positive("optim.base_batch", o.base_batch)
    fraction("optim.momentum", o.momentum)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov: needs optim.momentum > 0")
    positive("schedule.warmup_epochs", s.warmup_epochs, allow_zero=True)
    fraction("schedule.warmup_start_factor", s.warmup_start_factor)
    fraction("schedule.final_lr_factor", s.final_lr_factor)
    positive("schedule.gamma", s.gamma)
    if list(s.milestones) != sorted(s.milestones) or any(m <= 0 for m in s.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing positive epochs, "
                          f"got {s.milestones}")
    positive("train.epochs", t.epochs)
    if s.warmup_epochs > t.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({s.warmup_epochs}) exceeds train.epochs "
                          f"({t.epochs})")
    positive("train.eval_every", t.eval_every)
    positive("train.log_every", t.log_every)


# --------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value "
                          f"(e.g. optim.lr=0.2 or data.rrc.scale=[0.35,1.0])")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


# Keys of which a recipe sets one: an override of either replaces the recipe's choice.
_EITHER = (("data", "batch_size", "global_batch_size"),)


def apply_overrides(tree: dict, overrides: typing.Sequence[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        for section, a, b in _EITHER:
            if len(parts) == 2 and parts[0] == section and parts[1] in (a, b) and \
                    isinstance(tree.get(section), dict):
                tree[section].pop(b if parts[1] == a else a, None)
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return tree


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    try:
        cfg = _build(Config, tree, "")
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a recipe (or the defaults when `path` is None) and apply dotted overrides."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {source!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
        tree.setdefault("name", p.stem)
        tree.pop("resolved", None)  # a run folder's config.yaml is a valid recipe again
    if overrides:
        source += " + overrides"
    return config_from_dict(apply_overrides(tree, overrides), source)


def to_dict(cfg: Config) -> dict:
    """Plain, YAML-safe dict (tuples become lists)."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))


# --------------------------------------------------------------------------- resolving

@dataclass(frozen=True)
class Resolved:
    """Everything that follows from the config and the world size."""
    world_size: int
    batch_size: int          # per process
    global_batch_size: int
    lr: float                # effective peak LR after scaling to the global batch
    steps_per_epoch: Optional[int]  # None when the dataset size is not known yet
    train_images: Optional[int]

    def as_dict(self, cfg: Config) -> dict:
        spe = self.steps_per_epoch
        return {
            "world_size": self.world_size,
            "batch_size_per_process": self.batch_size,
            "global_batch_size": self.global_batch_size,
            "lr_effective": self.lr,
            "lr_rule": f"{cfg.optim.lr} per {cfg.optim.base_batch} images, "
                       f"{cfg.optim.lr_scaling} scaling to {self.global_batch_size}",
            "train_images": self.train_images,
            "steps_per_epoch": spe,
            "total_steps": None if spe is None else spe * cfg.train.epochs,
            "warmup_steps": None if spe is None else round(cfg.schedule.warmup_epochs * spe),
        }


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The one place where the LR follows the batch size."""
    k = global_batch / cfg.base_batch
    factor = {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[cfg.lr_scaling]
    return cfg.lr * factor


def resolve(cfg: Config, world_size: int, train_images: Optional[int] = None) -> Resolved:
    d = cfg.data
    if d.global_batch_size is not None:
        if d.global_batch_size % world_size:
            raise ConfigError(f"data.global_batch_size={d.global_batch_size} does not divide over "
                              f"{world_size} processes; pick a multiple of {world_size} or set "
                              f"data.batch_size (per process) instead")
        per = d.global_batch_size // world_size
    else:
        per = d.batch_size
    glob = per * world_size
    spe = None
    if train_images is not None:
        spe = (train_images // world_size) // per
        if spe == 0:
            raise ConfigError(f"data.train has {train_images} images: fewer than one global batch "
                              f"of {glob}; lower the batch size")
    return Resolved(world_size, per, glob, scaled_lr(cfg.optim, glob), spe, train_images)
