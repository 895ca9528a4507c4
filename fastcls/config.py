"""Typed configuration: YAML recipe + dotted command-line overrides -> frozen dataclasses.

    cfg = load_config("pipelines/demo.yaml", ["optim.lr=0.2", "data.rrc.scale=[0.35,1.0]"])

Each knob is stated once, on its field: its type (a `Literal[...]` lists the valid names),
default, range (`knob(..., gt=0)`, `ge`, `lt`, `le`, `ordered`) and help text, from which
docs/configuration.md's key table is generated (docs/config_table.py). Unknown keys, wrong
types and values outside the field's choices or range raise `ConfigError` naming the file,
the dotted key and what is valid (the generic machinery is fastcls/schema.py); `validate`
adds only the rules that involve several fields. Batch-size-dependent values are written per
reference batch (`optim.lr` is the LR for
`optim.base_batch` images) and scaled once, in `resolve()`, to the global batch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .schema import ConfigError, build, check_fields, knob, parse_override, section

# Names picked in YAML. Modules that implement them read these tuples (no second list).
Backend = Literal["native", "synthetic", "dali", "ffcv"]
Optimizer = Literal["sgd", "rmsprop", "adam", "adamw", "adadelta", "lars", "lamb"]
Schedule = Literal["cosine", "piecewise", "constant", "polynomial", "exponential"]
MixMode = Literal["batch", "pair", "elem"]
FillMode = Literal["const", "rand", "pixel"]
AutoAugmentPolicy = Literal["imagenet", "cifar10", "svhn"]
FFCVOrder = Literal["random", "quasi_random"]
Decoder = Literal["auto", "nvimgcodec", "torchvision"]
Antialias = Literal["auto", "on", "off"]
BACKENDS = typing.get_args(Backend)
OPTIMIZERS = typing.get_args(Optimizer)
SCHEDULES = typing.get_args(Schedule)
MIX_MODES = typing.get_args(MixMode)
FILL_MODES = typing.get_args(FillMode)
AUTOAUGMENT_POLICIES = typing.get_args(AutoAugmentPolicy)
FFCV_ORDERS = typing.get_args(FFCVOrder)
DECODERS = typing.get_args(Decoder)
ANTIALIAS_MODES = typing.get_args(Antialias)
# lr_scaling=auto: linear for the momentum methods, sqrt for the adaptive ones.
ADAPTIVE_OPTIMIZERS = ("rmsprop", "adam", "adamw", "adadelta", "lamb")


# --------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class ModelConfig:
    name: str = knob("resnet50", "torchvision classification name (resnet18, mobilenet_v3_large, ...), "
                     "timm:<name>, a guide name (ResNet50_vd, MobileNetV1_x0_25, ...; docs/recipes.md) "
                     "or resnet_tiny (the demo's CIFAR-style ResNet)")
    num_classes: int = knob(1000, "classifier width; must be >= the number of class folders", gt=0)
    channels_last: bool = knob(True, "NHWC memory format for model and input")
    compile: bool = knob(False, "torch.compile the model (the first epoch includes compile time)")
    pretrained: str = knob("", "fine-tuning: a fastcls checkpoint or a torchvision/timm state_dict "
                           "(.pth/.pt/.safetensors); classifier tensors of another shape are skipped")
    freeze_epochs: int = knob(0, "fine-tuning: train only the classifier for the first N epochs", ge=0)
    blurpool: bool = knob(False, "anti-aliased downsampling as ffcv-imagenet applies it: a 3x3 binomial "
                          "blur before every stride-2 conv with >= 16 input channels (same weights and "
                          "state_dict keys)")
    zero_init_residual: bool = knob(False, "zero the last BN gamma of every residual block (torchvision's "
                                    "zero_init_residual, timm's zero_init_last); false: the library's "
                                    "init (timm resnets and resnet_tiny zero it anyway)")


@dataclass(frozen=True)
class RRCConfig:
    """Random-resized-crop of training images (torchvision's RandomResizedCrop)."""
    scale: tuple[float, float] = knob((0.08, 1.0), "crop area range as a fraction of the image",
                                      gt=0, le=1, ordered=True)
    ratio: tuple[float, float] = knob((3 / 4, 4 / 3), "crop aspect range w/h (sampled in log space)",
                                      gt=0, ordered=True)


@dataclass(frozen=True)
class DaliConfig:
    """data.backend=dali only (fastcls/data/dali.py)."""
    hw_decoder_load: float = knob(0.65, "share of JPEGs sent to the NVJPG hardware decoder "
                                  "(A100/H100/H200; ignored elsewhere and on CPU)", ge=0, le=1)
    prefetch_queue_depth: int = knob(2, "batches DALI prepares ahead of the training step", gt=0)
    threads: int = knob(0, "DALI's CPU threads per pipeline (CPU decode, resize; on a GPU each "
                        "holds nvJPEG paddings: ~211 MB device + 2 x 140 MB pinned); 0 = auto: "
                        "4, at most the cores this process may use. Independent of data.workers "
                        "(DALI's Python source workers)", ge=0)


@dataclass(frozen=True)
class FFCVConfig:
    """data.backend=ffcv only (fastcls/data/ffcv_loader.py)."""
    order: FFCVOrder = knob("random", "random: seeded per epoch, sharded like native; quasi_random: "
                            "FFCV's page-local shuffle for datasets larger than RAM (one process only)")
    os_cache: bool = knob(True, "read through the OS page cache (shared by a node's ranks); false: "
                          "FFCV's own per-process cache (use with quasi_random)")
    batches_ahead: int = knob(3, "batches decoded ahead of the training step", gt=0)


@dataclass(frozen=True)
class WdsConfig:
    """Tar shards (WebDataset layout) on the native backend (fastcls/data/shards.py)."""
    shuffle_buffer: int = knob(4096, "training: samples each reader holds in memory to shuffle "
                               "within (on top of the per-epoch shard order); 0 = stream order",
                               ge=0)


@dataclass(frozen=True)
class ParquetConfig:
    """Parquet / Arrow image datasets, Hugging Face layout (fastcls/data/parquet.py)."""
    image_column: str = knob("", "the column of encoded images (Hugging Face Image feature or "
                             "binary); empty: image, img, jpg, ... or the Image feature")
    label_column: str = knob("", "the column of labels (ClassLabel integers or strings); empty: "
                             "label, labels, cls, ... or the ClassLabel feature")
    shuffle_buffer: int = knob(1024, "training: samples each reader shuffles within, on top of "
                               "the per-epoch row-group order (as data.wds.shuffle_buffer); each "
                               "worker keeps the row groups this window spans; 0 = file order", ge=0)


@dataclass(frozen=True)
class ProgressiveConfig:
    """Training image size per epoch (ffcv-imagenet's rule; off while start_size is 0).
    Epochs count from 0 as ffcv-imagenet's start_ramp/end_ramp (docs/data.md)."""
    start_size: int = knob(0, "training size up to and including epoch start_epoch (0 = off: "
                           "data.image_size every epoch)", ge=0)
    end_size: int = knob(0, "training size from epoch end_epoch on (0 = data.image_size)", ge=0)
    start_epoch: int = knob(0, "last epoch (from 0) at start_size; then linear in the epoch", ge=0)
    end_epoch: int = knob(0, "first epoch (from 0) at end_size", ge=0)
    multiple: int = knob(32, "sizes between start and end are rounded to a multiple of this", ge=1)


@dataclass(frozen=True)
class DataConfig:
    backend: Backend = knob("native", "native: PIL workers on CPU, batched GPU decode + Triton kernel "
                            "on CUDA; dali; ffcv (.beton files); synthetic: random tensors on the "
                            "device, for benchmarks (docs/data.md)")
    train: str = knob("", "ImageFolder root train/<class>/*.jpg, a list file ('path label' per "
                      "line), tar shards (native: a brace pattern, folder or .shards.json "
                      "index), Parquet/Arrow files (a file, folder, glob or brace pattern, a "
                      "save_to_disk folder); ffcv: a .beton file")
    val: str = knob("", "validation data, in the same forms as data.train")
    root: str = knob("", "list files: the folder their relative paths start from (default: the "
                     "list file's folder)")
    classes_file: str = knob("", "list files: class names, line i = class i ('name' or 'i name'); "
                             "default: the labels' numbers")
    demo: bool = knob(False, "generate and use the embedded demo dataset; an explicit data.train/"
                      "data.val on the command line turns it off")
    batch_size: Optional[int] = knob(None, "images per process per forward/backward pass (x "
                                     "train.accum_steps per optimizer step); or ...", gt=0)
    global_batch_size: Optional[int] = knob(None, "... images per optimizer step over all "
                                            "processes (set exactly one; must divide over the "
                                            "processes x train.accum_steps)", gt=0)
    image_size: int = knob(224, "training crop size (data.progressive: per epoch) and validation "
                           "crop size unless data.val_image_size is set", gt=0)
    val_image_size: int = knob(0, "validation center-crop size (0 = data.image_size): train low, "
                               "test high", ge=0)
    val_resize: int = knob(256, "validation: shorter side resized to this, then center crop "
                           "val_image_size", gt=0)
    progressive: ProgressiveConfig = section(ProgressiveConfig)
    rrc: RRCConfig = section(RRCConfig)
    hflip: float = knob(0.5, "probability of a horizontal flip", ge=0, le=1)
    workers: int = knob(8, "DataLoader worker processes per rank (dali: its Python source "
                        "workers, min 1, its threads are data.dali.threads; ffcv: its threads)", ge=0)
    pin_memory: bool = knob(True, "pinned host batches (GPU only)")
    max_bad_fraction: float = knob(0.01, "undecodable files tolerated per epoch and rank, as a "
                                   "fraction, before the run stops", ge=0, le=1)
    exclude: str = knob("", "text file of image paths to skip (python -m fastcls.tools.check "
                        "--exclude-out writes one)")
    synthetic_images: int = knob(12800, "epoch length of the synthetic backend", gt=0)
    dali: DaliConfig = section(DaliConfig)
    native_decode: Literal["auto", "workers", "batched"] = knob(
        "auto", "native backend: workers (PIL decode in workers), batched (workers read bytes; "
        "batch decode + one fused kernel), auto (batched on CUDA, workers on CPU)")
    antialias: Antialias = knob("auto", "batched path's resize filter: on (torchvision antialias=True "
                                "when downscaling), off (2-tap bilinear), auto (only on an axis "
                                "downscaled by more than 2x)")
    decoder: Decoder = knob("auto", "batched path's decoder: nvimgcodec, torchvision (decode_jpeg: "
                            "nvJPEG on CUDA), auto (nvImageCodec when installed)")
    timeout: float = knob(600.0, "seconds a worker batch may take before the run fails (hung "
                          "filesystem); 0 = wait forever", ge=0)
    ffcv: FFCVConfig = section(FFCVConfig)
    wds: WdsConfig = section(WdsConfig)
    parquet: ParquetConfig = section(ParquetConfig)


@dataclass(frozen=True)
class MixupConfig:
    """Mixup/CutMix with timm's names and semantics; off while both alphas are 0."""
    mixup_alpha: float = knob(0.0, "mixup Beta(a, a) (PaddleClas recipe: 0.2)", ge=0)
    cutmix_alpha: float = knob(0.0, "cutmix Beta(a, a) (PaddleClas recipe: 0.2)", ge=0)
    cutmix_minmax: Optional[tuple[float, float]] = knob(
        None, "[min, max] box side as a fraction of the image side (uniform); overrides "
        "cutmix_alpha, lam from the box", gt=0, le=1, ordered="strict")
    prob: float = knob(1.0, "probability of mixing a batch / pair / sample", ge=0, le=1)
    switch_prob: float = knob(0.5, "probability of cutmix instead of mixup when both alphas > 0",
                              ge=0, le=1)
    mode: MixMode = knob("batch", "batch (one draw per batch), pair (per pair i, N-1-i), elem "
                         "(per sample); the partner is the batch reversed")
    correct_lam: bool = knob(True, "cutmix lam = 1 - clipped box area / image area")
    off_epoch: int = knob(0, "no mixing from this epoch on (0 = never off)", ge=0)


@dataclass(frozen=True)
class CutoutConfig:
    """Cutout (DeVries & Taylor); PaddleClas: n_holes 1, length 112 at 224 px."""
    enabled: bool = knob(False, "turn Cutout on")
    n_holes: int = knob(1, "squares per image (may overlap)", ge=1)
    length: int = knob(112, "square side in pixels, clipped at the borders", ge=1)
    prob: float = knob(1.0, "probability per image", ge=0, le=1)


@dataclass(frozen=True)
class RandomErasingConfig:
    """Random Erasing (Zhong et al.); PaddleClas: p 0.5, sl 0.02, sh 0.4, r1 0.3."""
    enabled: bool = knob(False, "turn Random Erasing on")
    prob: float = knob(0.5, "probability per image", ge=0, le=1)
    area: tuple[float, float] = knob((0.02, 0.4), "erased area fraction range (sl, sh)",
                                     gt=0, le=1, ordered=True)
    aspect: tuple[float, float] = knob((0.3, 1 / 0.3), "h/w range (r1, 1/r1)", gt=0, ordered=True)
    log_aspect: bool = knob(False, "sample the aspect log-uniformly (torchvision/timm)")
    count: int = knob(1, "rectangles per erased image", ge=1)
    attempts: int = knob(100, "tries to fit a rectangle", ge=1)
    fill: FillMode = knob("const", "const (0 = the mean colour), rand (normal per channel), pixel "
                          "(normal per pixel)")


@dataclass(frozen=True)
class GridMaskConfig:
    """GridMask; PaddleClas: d1 96, d2 224, rotate 1, ratio 0.6, mode 1, prob 0.8."""
    enabled: bool = knob(False, "turn GridMask on")
    d1: int = knob(96, "grid period range [d1, d2) in pixels", ge=2)
    d2: int = knob(224, "upper end of the period range (> d1)")
    ratio: float = knob(0.6, "stripe width / period", ge=0, le=1)
    rotate: int = knob(1, "angle ~ U{0..rotate-1} degrees (1 = no rotation)", ge=1)
    mode: Literal[0, 1] = knob(1, "0: erase the stripes, 1: erase the squares between them")
    prob: float = knob(0.8, "probability per image", ge=0, le=1)


@dataclass(frozen=True)
class HideAndSeekConfig:
    """Hide-and-Seek; PaddleClas: grid sizes 0/16/32/44/56, hide prob 0.5."""
    enabled: bool = knob(False, "turn Hide-and-Seek on")
    grid_sizes: list[int] = knob(help="patch sizes in pixels, one drawn per image (0 = hide nothing)",
                                 factory=lambda: [0, 16, 32, 44, 56], ge=0, nonempty=True)
    hide_prob: float = knob(0.5, "probability of hiding each patch", ge=0, le=1)


@dataclass(frozen=True)
class AutoAugmentConfig:
    enabled: bool = knob(False, "turn AutoAugment on (sub-policy chosen per image)")
    policy: AutoAugmentPolicy = knob("imagenet", "torchvision's policy tables")


@dataclass(frozen=True)
class RandAugmentConfig:
    """RandAugment; PaddleClas: num_layers 2, magnitude 5 (of 10)."""
    enabled: bool = knob(False, "turn RandAugment on (ops chosen per image)")
    num_ops: int = knob(2, "ops applied per image", ge=1)
    magnitude: int = knob(5, "bin index in 0..num_magnitude_bins-1", ge=0)
    num_magnitude_bins: int = knob(11, "11 bins: magnitude 5 is half strength, PaddleClas's 5 of 10",
                                   ge=2)
    magnitude_std: float = knob(0.0, "Gaussian noise on the magnitude per image and op (timm)", ge=0)


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentations on the device after any loader (docs/augment.md)."""
    label_smoothing: float = knob(0.0, "epsilon: the target gets 1 - e + e/C, the others e/C "
                                  "(= nn.CrossEntropyLoss(label_smoothing=e))", ge=0, le=1)
    mixup: MixupConfig = section(MixupConfig)
    cutout: CutoutConfig = section(CutoutConfig)
    random_erasing: RandomErasingConfig = section(RandomErasingConfig)
    gridmask: GridMaskConfig = section(GridMaskConfig)
    hide_and_seek: HideAndSeekConfig = section(HideAndSeekConfig)
    autoaugment: AutoAugmentConfig = section(AutoAugmentConfig)
    randaugment: RandAugmentConfig = section(RandAugmentConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: Optimizer = knob("sgd", "sgd (momentum, torch fused), rmsprop, adam, adamw, adadelta, "
                           "lars, lamb (docs/recipes.md)")
    lr: float = knob(0.1, "LR per optim.base_batch images; scaled to the global batch", gt=0)
    base_batch: int = knob(256, "reference batch of optim.lr", gt=0)
    lr_scaling: Literal["linear", "sqrt", "none", "auto"] = knob(
        "auto", "linear (Goyal et al.: lr x global/base), sqrt, none; auto = linear for sgd/lars, "
        "sqrt for the adaptive optimizers")
    momentum: float = knob(0.9, "momentum (sgd, rmsprop, lars)", ge=0, le=1)
    nesterov: bool = knob(False, "Nesterov momentum (needs momentum > 0)")
    weight_decay: float = knob(1e-4, "alias optim.l2_decay (Paddle's name). Coupled L2 for sgd/"
                               "rmsprop/adam/adadelta/lars, decoupled for adamw/lamb", ge=0)
    no_decay_norm_bias: bool = knob(False, "no weight decay on params with ndim <= 1 (biases, norm "
                                    "weights; found by shape); always on for lars/lamb")
    betas: tuple[float, float] = knob((0.9, 0.999), "adam, adamw, lamb", ge=0, lt=1)
    eps: Optional[float] = knob(None, "null = the optimizer's default (1e-8; lamb, adadelta 1e-6)",
                                gt=0)
    alpha: float = knob(0.99, "rmsprop: smoothing of the squared-gradient average (Paddle's rho)",
                        ge=0, le=1)
    rho: float = knob(0.9, "adadelta: smoothing of the running averages", ge=0, le=1)
    trust_coeff: float = knob(0.001, "lars: trust coefficient eta (You et al. 2017)", gt=0)
    clip_grad_norm: float = knob(0.0, "clip the global gradient L2 norm to this before each "
                                 "optimizer step (torch.nn.utils.clip_grad_norm_; fp16: after "
                                 "GradScaler.unscale_); 0 = off", ge=0)
    impl: Literal["auto", "torch", "apex"] = knob(
        "auto", "auto: apex's fused kernel (sgd, adam, adamw, lamb) when apex imports and the model "
        "is on CUDA, else torch/timm; torch; apex (an error if unavailable)")


@dataclass(frozen=True)
class ScheduleConfig:
    """LR per iteration: optional linear warmup, then the decay (docs/recipes.md)."""
    name: Schedule = knob("cosine", "the decay after warmup")
    warmup_epochs: float = knob(0.0, "linear warmup length in epochs (fractions allowed)", ge=0)
    warmup_start_factor: float = knob(0.0, "warmup starts at this fraction of the peak LR",
                                      ge=0, le=1)
    final_lr_factor: float = knob(0.0, "cosine and polynomial end at this fraction of the peak LR",
                                  ge=0, le=1)
    milestones: list[int] = knob(help="piecewise: epochs at which the LR is multiplied by gamma",
                                 factory=lambda: [30, 60, 90], gt=0, ordered=True)
    gamma: float = knob(0.1, "piecewise: decay factor per milestone", gt=0)
    power: float = knob(1.0, "polynomial: final + (peak - final) * (1 - t/T) ** power", gt=0)
    exp_gamma: float = knob(0.97, "exponential: LR factor per epoch, applied smoothly every step",
                            gt=0)


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights (timm's ModelEmaV3 rule); off while decay is 0."""
    decay: float = knob(0.0, "EMA weight per update: ema = decay * ema + (1 - decay) * model, floating "
                        "state (params, BN statistics); 0 = off", ge=0, lt=1)
    every: int = knob(1, "update after every N optimizer steps", gt=0)
    warmup: bool = knob(False, "timm's decay warmup: update k (from 1) uses min(decay, 1 - k ** -2/3)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = knob(90, "epochs to train", gt=0)
    amp: Literal["bf16", "fp16", "off"] = knob("bf16", "autocast dtype (fp16 with a GradScaler); "
                                               "on GPU and CPU")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto: this rank's GPU if CUDA is "
                                                  "available, else the CPU")
    out_dir: str = knob("", "run folder (default: runs/<recipe name>)")
    resume: str = knob("", "auto (the newest verified out_dir/last*.pt, mid-epoch included) or a "
                       "checkpoint path")
    seed: int = knob(0, "seeds init, shuffling and every sample's crop/flip/augmentation")
    eval_every: int = knob(1, "evaluate (and checkpoint) every N epochs and after the last", gt=0)
    log_every: int = knob(50, "steps between progress-bar updates: the loop's only host/device "
                          "syncs", gt=0)
    progress: bool = knob(True, "tqdm progress bar on rank 0")
    diagnose: Literal["auto", "running", "clean", "off"] = knob(
        "auto", "fit diagnosis after each evaluation: running (augmented-batch train accuracy), "
        "clean (an extra eval pass over the train images), auto (clean when mixup/cutmix is on)")
    diagnose_overfit_gap: float = knob(5.0, "train top-1 - val top-1 (points) above which a "
                                       "reading is overfitting (if also > 2 standard errors)", ge=0)
    diagnose_underfit_gap: float = knob(1.0, "val top-1 - train top-1 (points) above which a "
                                        "reading is underfitting (if also > 2 standard errors)", ge=0)
    checkpoint_every: int = knob(0, "steps between mid-epoch checkpoints (0: at epoch ends and on "
                                 "preemption only)", ge=0)
    keep_checkpoints: int = knob(3, "checkpoints kept (last.pt, last.1.pt, ...): the fallback when "
                                 "the newest is corrupt", gt=0)
    deterministic: bool = knob(False, "torch.use_deterministic_algorithms, cuDNN autotuning off "
                               "(bitwise resume)")
    slurm_requeue: bool = knob(True, "in a SLURM job, on SIGUSR1/SIGTERM: checkpoint, then rank 0 "
                               "runs scontrol requeue")
    accum_steps: int = knob(1, "gradient accumulation: micro-batches of data.batch_size per "
                            "optimizer step; the global batch (LR scaling, schedule steps) is "
                            "batch x processes x accum_steps", ge=1)
    tensorboard: bool = knob(False, "write TensorBoard event files to out_dir/tb (rank 0): the "
                             "progress-bar scalars every log_every steps, metrics.jsonl values "
                             "per evaluation")
    ema: EMAConfig = section(EMAConfig)
    eval_tta: Literal["none", "flip"] = knob("none", "test-time augmentation at evaluation: flip = mean "
                                             "of the logits of the image and its mirror")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    augment: AugmentConfig = section(AugmentConfig)
    optim: OptimConfig = section(OptimConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    train: TrainConfig = section(TrainConfig)
    name: str = knob("run", "recipe name (default: the recipe's file name)")


def validate(cfg: Config) -> None:
    """Field choices and ranges, then the rules that involve several fields."""
    from .models import is_model_name, model_names  # lazy: keeps `--print-config` errors cheap

    check_fields(cfg)
    d, o, s, t, a = cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.augment
    if not is_model_name(cfg.model.name):
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; valid choices: "
                          f"{', '.join(model_names())}")
    if (d.batch_size is None) == (d.global_batch_size is None):
        raise ConfigError("data: set exactly one of data.batch_size (per process) or "
                          "data.global_batch_size (divided over the processes)")
    if d.demo and (d.train or d.val):
        raise ConfigError(f"data.demo: true trains on the demo dataset, but data.train/data.val "
                          f"are set too ({d.train or d.val!r}); set data.demo=false to use them")
    val_size = d.val_image_size or d.image_size
    if d.val_resize < val_size:
        which = "data.val_image_size" if d.val_image_size else "data.image_size"
        raise ConfigError(f"data.val_resize ({d.val_resize}) must be >= {which} ({val_size}): "
                          f"validation center-crops {val_size} px")
    p = d.progressive
    if p.start_size:
        end = p.end_size or d.image_size
        if p.start_size > end:
            raise ConfigError(f"data.progressive.start_size ({p.start_size}) must be <= end_size "
                              f"({end}{'' if p.end_size else ' = data.image_size'})")
        if p.start_epoch > p.end_epoch:
            raise ConfigError(f"data.progressive.start_epoch ({p.start_epoch}) must be <= end_epoch "
                              f"({p.end_epoch})")
        if p.end_epoch >= t.epochs:
            raise ConfigError(f"data.progressive.end_epoch ({p.end_epoch}) must be < train.epochs "
                              f"({t.epochs}): epochs count from 0, so the ramp would not reach "
                              f"end_size")
    elif p.end_size or p.start_epoch or p.end_epoch:
        raise ConfigError("data.progressive: set start_size > 0 to turn progressive resizing on "
                          "(end_size/start_epoch/end_epoch do nothing while start_size is 0)")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov: needs optim.momentum > 0")
    if s.warmup_epochs > t.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({s.warmup_epochs}) exceeds train.epochs "
                          f"({t.epochs})")
    m = a.mixup
    if m.cutmix_minmax is not None and m.mixup_alpha == 0 and m.cutmix_alpha == 0:
        raise ConfigError("augment.mixup.cutmix_minmax: set augment.mixup.cutmix_alpha > 0 "
                          "(mixing is off while both alphas are 0)")
    if a.gridmask.d2 <= a.gridmask.d1:
        raise ConfigError(f"augment.gridmask.d2 ({a.gridmask.d2}) must be > augment.gridmask.d1 "
                          f"({a.gridmask.d1})")
    ra = a.randaugment
    if ra.magnitude >= ra.num_magnitude_bins:
        raise ConfigError(f"augment.randaugment.magnitude: must be in 0..num_magnitude_bins-1 "
                          f"(= {ra.num_magnitude_bins - 1}), got {ra.magnitude}")


# --------------------------------------------------------------------------- loading

# Keys of which a recipe sets one: an override of either replaces the recipe's choice.
_EITHER = (("data", "batch_size", "global_batch_size"),)
# Accepted spellings -> the schema's key. `optim.l2_decay` is Paddle's name (the guide's).
ALIASES = {("optim", "l2_decay"): "weight_decay"}


def normalize_aliases(tree: dict, source: str = "config") -> dict:
    """Rename alias keys in place (optim.l2_decay -> optim.weight_decay); both is an error."""
    for (section_, alias), canonical in ALIASES.items():
        node = tree.get(section_)
        if isinstance(node, dict) and alias in node:
            if canonical in node:
                raise ConfigError(f"{source}: {section_}.{alias} is an alias of {section_}.{canonical}; "
                                  f"set only one of them")
            node[canonical] = node.pop(alias)
    return tree


def apply_overrides(tree: dict, overrides: typing.Sequence[str],
                    notes: Optional[list[str]] = None) -> dict:
    """Apply dotted overrides to a recipe tree in place. An explicit data.train/data.val turns
    the recipe's data.demo off (unless data.demo is overridden too), noted in `notes`."""
    normalize_aliases(tree)
    parsed = []
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 2 and tuple(parts) in ALIASES:
            parts = [parts[0], ALIASES[tuple(parts)]]
        parsed.append((text, parts, value))
    keys = {".".join(p) for _, p, _ in parsed}
    data = tree.get("data")
    if keys & {"data.train", "data.val"} and "data.demo" not in keys and \
            isinstance(data, dict) and data.get("demo") is True:
        data["demo"] = False
        if notes is not None:
            notes.append("data.train/data.val given on the command line: the recipe's data.demo "
                         "is off, training on them")
    for text, parts, value in parsed:
        for section_, a, b in _EITHER:
            if len(parts) == 2 and parts[0] == section_ and parts[1] in (a, b) and \
                    isinstance(tree.get(section_), dict):
                tree[section_].pop(b if parts[1] == a else a, None)
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
        cfg = build(Config, tree, "")
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = (),
                notes: Optional[list[str]] = None) -> Config:
    """Load a recipe (or the defaults when `path` is None) and apply dotted overrides.
    Lines a user should see about how the overrides were applied go to `notes`."""
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
    return config_from_dict(apply_overrides(tree, overrides, notes), source)


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
    batch_size: int          # per process per forward/backward (a micro-batch when accumulating)
    global_batch_size: int   # images per optimizer step: batch_size x world_size x accum_steps
    lr: float                # effective peak LR after scaling to the global batch
    steps_per_epoch: Optional[int]  # optimizer steps; None when the dataset size is not known yet
    train_images: Optional[int]
    accum_steps: int = 1     # micro-batches per optimizer step (train.accum_steps)

    def as_dict(self, cfg: Config) -> dict:
        spe = self.steps_per_epoch
        return {
            "world_size": self.world_size,
            "batch_size_per_process": self.batch_size,
            "accum_steps": self.accum_steps,
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
    """Batches, LR and steps for `world_size` processes. With gradient accumulation the
    optimizer sees batch x world_size x accum_steps images per step: that global batch is
    what the LR is scaled to and what the schedule's steps count."""
    d, accum = cfg.data, cfg.train.accum_steps
    if d.global_batch_size is not None:
        if d.global_batch_size % (world_size * accum):
            over = f"{world_size} processes" + (f" x {accum} accumulation steps" if accum > 1 else "")
            raise ConfigError(f"data.global_batch_size={d.global_batch_size} does not divide over "
                              f"{over}; pick a multiple of {world_size * accum} or set "
                              f"data.batch_size (per process) instead")
        per = d.global_batch_size // (world_size * accum)
    else:
        per = d.batch_size
    glob = per * world_size * accum
    spe = None
    if train_images is not None:
        spe = (train_images // world_size) // (per * accum)
        if spe == 0:
            raise ConfigError(f"data.train has {train_images} images: fewer than one global batch "
                              f"of {glob}; lower the batch size")
    return Resolved(world_size, per, glob, scaled_lr(cfg.optim, glob), spe, train_images, accum)
