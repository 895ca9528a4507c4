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
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw", "adadelta", "lars", "lamb")
SCHEDULES = ("cosine", "piecewise", "constant", "polynomial", "exponential")
LR_SCALING = ("linear", "sqrt", "none", "auto")
OPTIM_IMPLS = ("auto", "torch", "apex")
DIAGNOSE_MODES = ("auto", "running", "clean", "off")
# lr_scaling=auto: linear for the momentum methods, sqrt for the adaptive ones (issue 7).
ADAPTIVE_OPTIMIZERS = ("rmsprop", "adam", "adamw", "adadelta", "lamb")
AMP_MODES = ("bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
NATIVE_DECODE = ("auto", "workers", "batched")  # native backend: PIL workers | batched decode + kernel
ANTIALIAS = ("auto", "on", "off")               # batched path's resize filter when downscaling
DECODERS = ("auto", "nvimgcodec", "torchvision")  # batched path's decoder


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the key and what is valid."""


# --------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class RRCConfig:
    scale: tuple[float, float] = (0.08, 1.0)   # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h (sampled in log space)


@dataclass(frozen=True)
class DaliConfig:
    hw_decoder_load: float = 0.65         # share of JPEGs on the NVJPG hardware decoder (A100/H100/H200)
    prefetch_queue_depth: int = 2         # batches DALI prepares ahead of the training step


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    num_classes: int = 1000
    channels_last: bool = True
    compile: bool = False
    pretrained: str = ""              # fine-tuning: fastcls checkpoint or torchvision/timm state_dict
    freeze_epochs: int = 0            # fine-tuning: train only the classifier for N epochs


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
    exclude: str = ""                     # file listing images to skip (fastcls.data.check --exclude-out)
    synthetic_images: int = 12800         # epoch length of the synthetic backend
    dali: DaliConfig = field(default_factory=DaliConfig)  # data.backend=dali only
    native_decode: str = "auto"           # auto (batched on CUDA, workers on CPU) | workers | batched
    antialias: str = "auto"               # batched path: on | off | auto (only when downscaling > 2x)
    decoder: str = "auto"                 # batched path: auto (nvimgcodec if installed) | nvimgcodec | torchvision
    timeout: float = 600.0                # s a worker batch may take before the run fails (0: wait forever)
    ffcv: FFCVConfig = field(default_factory=FFCVConfig)


@dataclass(frozen=True)
class MixupConfig:  # timm's Mixup names; off while both alphas are 0
    mixup_alpha: float = 0.0          # Beta(a, a) for mixup (PaddleClas recipe: 0.2)
    cutmix_alpha: float = 0.0         # Beta(a, a) for cutmix (PaddleClas recipe: 0.2)
    cutmix_minmax: Optional[tuple[float, float]] = None  # box side range (fraction); overrides alpha
    prob: float = 1.0                 # probability of mixing a batch/pair/sample
    switch_prob: float = 0.5          # P(cutmix) when both alphas > 0
    mode: str = "batch"               # batch | pair | elem
    correct_lam: bool = True          # lam = 1 - clipped box area / image area
    off_epoch: int = 0                # no mixing from this epoch on (0 = never off)


@dataclass(frozen=True)
class CutoutConfig:  # PaddleClas: n_holes 1, length 112 (at 224 px)
    enabled: bool = False
    n_holes: int = 1
    length: int = 112                 # square side in pixels
    prob: float = 1.0


@dataclass(frozen=True)
class RandomErasingConfig:  # Zhong et al. / PaddleClas: p 0.5, sl 0.02, sh 0.4, r1 0.3
    enabled: bool = False
    prob: float = 0.5
    area: tuple[float, float] = (0.02, 0.4)        # erased area fraction range (sl, sh)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)   # h/w range (r1, 1/r1)
    log_aspect: bool = False          # sample the aspect log-uniformly (torchvision/timm)
    count: int = 1                    # rectangles per erased image
    attempts: int = 100               # tries to fit a rectangle
    fill: str = "const"               # const (0 = mean colour) | rand | pixel


@dataclass(frozen=True)
class GridMaskConfig:  # PaddleClas: d1 96, d2 224, rotate 1, ratio 0.6, mode 1, prob 0.8
    enabled: bool = False
    d1: int = 96                      # grid period range [d1, d2) in pixels
    d2: int = 224
    ratio: float = 0.6                # stripe width / period
    rotate: int = 1                   # angle ~ U{0..rotate-1} degrees (1 = no rotation)
    mode: int = 1                     # 0: erase stripes, 1: erase the squares between them
    prob: float = 0.8


@dataclass(frozen=True)
class HideAndSeekConfig:  # PaddleClas: grid sizes 0/16/32/44/56, hide prob 0.5
    enabled: bool = False
    grid_sizes: list[int] = field(default_factory=lambda: [0, 16, 32, 44, 56])  # 0 = hide nothing
    hide_prob: float = 0.5


@dataclass(frozen=True)
class AutoAugmentConfig:
    enabled: bool = False
    policy: str = "imagenet"          # imagenet | cifar10 | svhn (torchvision's tables)


@dataclass(frozen=True)
class RandAugmentConfig:  # PaddleClas: num_layers 2, magnitude 5 (of 10)
    enabled: bool = False
    num_ops: int = 2
    magnitude: int = 5                # bin index in 0..num_magnitude_bins-1
    num_magnitude_bins: int = 11      # 11 bins: magnitude 5 = half strength, as PaddleClas 5/10
    magnitude_std: float = 0.0        # Gaussian noise on the magnitude per sample and op (timm)


@dataclass(frozen=True)
class AugmentConfig:
    label_smoothing: float = 0.0
    mixup: MixupConfig = field(default_factory=MixupConfig)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)
    random_erasing: RandomErasingConfig = field(default_factory=RandomErasingConfig)
    gridmask: GridMaskConfig = field(default_factory=GridMaskConfig)
    hide_and_seek: HideAndSeekConfig = field(default_factory=HideAndSeekConfig)
    autoaugment: AutoAugmentConfig = field(default_factory=AutoAugmentConfig)
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1                 # LR for base_batch images; scaled to the global batch
    base_batch: int = 256
    lr_scaling: str = "auto"        # linear (Goyal et al. 2017) | sqrt | none | auto (linear for sgd/lars, sqrt for adaptive)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4      # coupled L2 (torch SGD), Paddle's l2_decay
    no_decay_norm_bias: bool = False  # exclude params with ndim <= 1 from weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw, lamb
    eps: Optional[float] = None       # None: the optimizer's default (1e-8; lamb 1e-6; adadelta 1e-6)
    alpha: float = 0.99               # rmsprop: smoothing of the squared-gradient average (Paddle's rho)
    rho: float = 0.9                  # adadelta: smoothing of the running averages
    trust_coeff: float = 0.001        # lars: eta of You et al. 2017
    impl: str = "auto"                # auto (apex's fused kernels when importable, on CUDA) | torch | apex


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.0  # warmup starts at this fraction of the peak LR
    final_lr_factor: float = 0.0      # cosine ends at this fraction of the peak LR
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # epochs (piecewise)
    gamma: float = 0.1                # piecewise decay factor per milestone
    power: float = 1.0                # polynomial: (1 - t/T) ** power
    exp_gamma: float = 0.97           # exponential: LR factor per epoch (applied continuously per step)


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
    diagnose: str = "auto"            # fit diagnosis after each evaluation: auto|running|clean|off
    diagnose_overfit_gap: float = 5.0  # train top-1 - val top-1 above this: overfitting
    diagnose_underfit_gap: float = 1.0  # val top-1 - train top-1 above this: underfitting
    checkpoint_every: int = 0         # steps between mid-epoch checkpoints (0: epoch ends only)
    keep_checkpoints: int = 3         # last.pt + last.1.pt ... (fallback when the newest is corrupt)
    deterministic: bool = False       # torch.use_deterministic_algorithms (bitwise resume)
    slurm_requeue: bool = True        # on SIGUSR1/SIGTERM in a SLURM job: checkpoint + scontrol requeue


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
    from .models import is_model_name, model_names  # lazy: keeps `--print-config` errors cheap

    d, o, s, t = cfg.data, cfg.optim, cfg.schedule, cfg.train
    _choice("data.backend", d.backend, BACKENDS)
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("optim.lr_scaling", o.lr_scaling, LR_SCALING)
    _choice("optim.impl", o.impl, OPTIM_IMPLS)
    _choice("train.diagnose", t.diagnose, DIAGNOSE_MODES)
    _choice("schedule.name", s.name, SCHEDULES)
    _choice("train.amp", t.amp, AMP_MODES)
    _choice("train.device", t.device, DEVICES)
    _choice("data.native_decode", d.native_decode, NATIVE_DECODE)
    _choice("data.antialias", d.antialias, ANTIALIAS)
    _choice("data.decoder", d.decoder, DECODERS)
    names = model_names()
    if not is_model_name(cfg.model.name):
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
    fraction("data.dali.hw_decoder_load", d.dali.hw_decoder_load)
    positive("data.dali.prefetch_queue_depth", d.dali.prefetch_queue_depth)
    _choice("data.ffcv.order", d.ffcv.order, ("random", "quasi_random"))
    positive("data.ffcv.batches_ahead", d.ffcv.batches_ahead)
    fraction("augment.label_smoothing", cfg.augment.label_smoothing)
    positive("optim.lr", o.lr)
    positive("optim.base_batch", o.base_batch)
    fraction("optim.momentum", o.momentum)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"optim.betas[{i}]: must be in [0, 1), got {b}")
    if o.eps is not None:
        positive("optim.eps", o.eps)
    fraction("optim.alpha", o.alpha)
    fraction("optim.rho", o.rho)
    positive("optim.trust_coeff", o.trust_coeff)
    positive("model.freeze_epochs", cfg.model.freeze_epochs, allow_zero=True)
    positive("schedule.power", s.power)
    positive("schedule.exp_gamma", s.exp_gamma)
    positive("train.diagnose_overfit_gap", t.diagnose_overfit_gap, allow_zero=True)
    positive("train.diagnose_underfit_gap", t.diagnose_underfit_gap, allow_zero=True)
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
    positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    positive("train.keep_checkpoints", t.keep_checkpoints)
    positive("data.timeout", d.timeout, allow_zero=True)
    validate_augment(cfg.augment)


MIX_MODES = ("batch", "pair", "elem")
FILL_MODES = ("const", "rand", "pixel")
AUTOAUGMENT_POLICIES = ("imagenet", "cifar10", "svhn")


def validate_augment(a: AugmentConfig) -> None:
    """Range and name checks of the `augment` section."""
    def fraction(key: str, v: float) -> None:
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {v}")

    def at_least(key: str, v: float, lo: float) -> None:
        if v < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {v}")

    m = a.mixup
    at_least("augment.mixup.mixup_alpha", m.mixup_alpha, 0)
    at_least("augment.mixup.cutmix_alpha", m.cutmix_alpha, 0)
    fraction("augment.mixup.prob", m.prob)
    fraction("augment.mixup.switch_prob", m.switch_prob)
    _choice("augment.mixup.mode", m.mode, MIX_MODES)
    at_least("augment.mixup.off_epoch", m.off_epoch, 0)
    if m.cutmix_minmax is not None and not (0 < m.cutmix_minmax[0] < m.cutmix_minmax[1] <= 1):
        raise ConfigError(f"augment.mixup.cutmix_minmax: must satisfy 0 < min < max <= 1, "
                          f"got {list(m.cutmix_minmax)}")
    if m.cutmix_minmax is not None and m.mixup_alpha == 0 and m.cutmix_alpha == 0:
        raise ConfigError("augment.mixup.cutmix_minmax: set augment.mixup.cutmix_alpha > 0 "
                          "(mixing is off while both alphas are 0)")
    c = a.cutout
    at_least("augment.cutout.n_holes", c.n_holes, 1)
    at_least("augment.cutout.length", c.length, 1)
    fraction("augment.cutout.prob", c.prob)
    r = a.random_erasing
    fraction("augment.random_erasing.prob", r.prob)
    if not 0 < r.area[0] <= r.area[1] <= 1:
        raise ConfigError(f"augment.random_erasing.area: must satisfy 0 < min <= max <= 1, got {list(r.area)}")
    if not 0 < r.aspect[0] <= r.aspect[1]:
        raise ConfigError(f"augment.random_erasing.aspect: must satisfy 0 < min <= max, got {list(r.aspect)}")
    at_least("augment.random_erasing.count", r.count, 1)
    at_least("augment.random_erasing.attempts", r.attempts, 1)
    _choice("augment.random_erasing.fill", r.fill, FILL_MODES)
    g = a.gridmask
    at_least("augment.gridmask.d1", g.d1, 2)
    if g.d2 <= g.d1:
        raise ConfigError(f"augment.gridmask.d2 ({g.d2}) must be > augment.gridmask.d1 ({g.d1})")
    fraction("augment.gridmask.ratio", g.ratio)
    at_least("augment.gridmask.rotate", g.rotate, 1)
    _choice("augment.gridmask.mode", str(g.mode), ("0", "1"))
    fraction("augment.gridmask.prob", g.prob)
    h = a.hide_and_seek
    if not h.grid_sizes or any(s < 0 for s in h.grid_sizes):
        raise ConfigError(f"augment.hide_and_seek.grid_sizes: non-empty list of sizes >= 0 (0 = no "
                          f"hiding), got {h.grid_sizes}")
    fraction("augment.hide_and_seek.hide_prob", h.hide_prob)
    _choice("augment.autoaugment.policy", a.autoaugment.policy, AUTOAUGMENT_POLICIES)
    ra = a.randaugment
    at_least("augment.randaugment.num_ops", ra.num_ops, 1)
    at_least("augment.randaugment.num_magnitude_bins", ra.num_magnitude_bins, 2)
    if not 0 <= ra.magnitude < ra.num_magnitude_bins:
        raise ConfigError(f"augment.randaugment.magnitude: must be in 0..num_magnitude_bins-1 "
                          f"(= {ra.num_magnitude_bins - 1}), got {ra.magnitude}")
    at_least("augment.randaugment.magnitude_std", ra.magnitude_std, 0)


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
# Accepted spellings -> the schema's key. `optim.l2_decay` is Paddle's name (the guide's).
ALIASES = {("optim", "l2_decay"): "weight_decay"}


def normalize_aliases(tree: dict, source: str = "config") -> dict:
    """Rename alias keys in place (optim.l2_decay -> optim.weight_decay); both is an error."""
    for (section, alias), canonical in ALIASES.items():
        node = tree.get(section)
        if isinstance(node, dict) and alias in node:
            if canonical in node:
                raise ConfigError(f"{source}: {section}.{alias} is an alias of {section}.{canonical}; "
                                  f"set only one of them")
            node[canonical] = node.pop(alias)
    return tree


def apply_overrides(tree: dict, overrides: typing.Sequence[str]) -> dict:
    normalize_aliases(tree)
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 2 and tuple(parts) in ALIASES:
            parts = [parts[0], ALIASES[tuple(parts)]]
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
        normalize_aliases(tree)
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
                       f"{lr_scaling_rule(cfg.optim)} scaling to {self.global_batch_size}",
            "train_images": self.train_images,
            "steps_per_epoch": spe,
            "total_steps": None if spe is None else spe * cfg.train.epochs,
            "warmup_steps": None if spe is None else round(cfg.schedule.warmup_epochs * spe),
        }


def lr_scaling_rule(cfg: OptimConfig) -> str:
    """The effective rule: `auto` is linear (Goyal et al.) for sgd/lars, sqrt for adaptive ones."""
    if cfg.lr_scaling == "auto":
        return "sqrt" if cfg.name in ADAPTIVE_OPTIMIZERS else "linear"
    return cfg.lr_scaling


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The one place where the LR follows the batch size."""
    k = global_batch / cfg.base_batch
    factor = {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[lr_scaling_rule(cfg)]
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
