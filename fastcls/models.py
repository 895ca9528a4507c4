"""Model registry: name -> nn.Module.

Names are torchvision's classification models (`resnet50`, `mobilenet_v3_large`, ...),
`timm:<name>` for any timm model, the PaddleClas guide's names (docs/recipes.md,
"Models by the guide's names") mapped onto library implementations, plus the small families below that
no library ships:

| guide name | built from |
|---|---|
| ResNet18/34/50/101/152 | torchvision `resnet*` |
| ResNet18_vd/34_vd/50_vd/101_vd/152_vd (ResNet-D) | timm `resnet*d` (3-conv stem, avg-pool downsample) |
| MobileNetV1_x0_25/x0_5/x0_75, MobileNetV1 | `MobileNetV1` below (hand-written: timm only has widths 1.0/1.25) |
| MobileNetV2_x0_25/x0_5/x0_75, MobileNetV2, _x1_5, _x2_0 | torchvision `mobilenet_v2(width_mult=...)` |
| MobileNetV3_large/small_x0_35/x0_5/x0_75/x1_0/x1_25 | torchvision `mobilenet_v3_*(width_mult=...)` |

Every builder returns a randomly initialized model: input N×3×H×W float (ImageNet-
normalized, any H, W >= 32), output N×num_classes logits. Two options change any of them
after construction (`build_model(..., blurpool=, zero_init_residual=)`): `apply_blurpool`
(ffcv-imagenet's anti-aliased downsampling) and `zero_init_residual` (Goyal et al.).
Every model's classifier computes in fp32 under autocast (`fp32_logits`: fp32 logits, no
bf16 ties; docs/inference.md), with the same state_dict keys.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck


class TinyResNet(nn.Module):
    """CIFAR-style ResNet for small images (the demo's model).

    Hand-wired because torchvision's ResNet fixes its widths at 64..512 and its stem at a
    7x7/2 conv + max-pool, which throws away most of a 64 px image; the blocks themselves
    are torchvision's `BasicBlock`. Input N×3×H×W float, output N×num_classes logits.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256),
                 blocks: tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or cin != w:
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(w))
                layers.append(BasicBlock(cin, w, stride, down))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block (Goyal et al. 2017)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017, arXiv:1704.04861) with a width multiplier `scale`,
    laid out as PaddleClas's `MobileNetV1_x{scale}`: 3x3/2 conv, 13 depthwise-separable
    blocks (3x3 depthwise + 1x1 pointwise, each BN + ReLU), global average pool, one FC.

    Hand-written because no maintained library builds the guide's widths (timm registers
    only `mobilenetv1_100`/`_125`, and torchvision has no V1). Channels are
    `int(c * scale)`, as PaddleClas does. Parameter counts are asserted against the
    published figures in tests/test_models.py."""

    # (output channels at scale 1, stride) of the 13 depthwise-separable blocks
    CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int, scale: float = 1.0):
        super().__init__()

        def cbr(cin, cout, k, stride, groups=1):
            return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        cin = int(32 * scale)
        layers = cbr(3, cin, 3, 2)
        for c, stride in self.CFG:
            cout = int(c * scale)
            layers += cbr(cin, cin, 3, stride, groups=cin) + cbr(cin, cout, 1, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


def _widths(prefix: str, widths: dict[str, float], plain: str) -> dict[str, float]:
    """{"MobileNetV2_x0_25": 0.25, ..., "MobileNetV2": 1.0}: the guide's naming scheme."""
    out = {f"{prefix}_{suffix}": w for suffix, w in widths.items()}
    out[plain] = 1.0
    return out


_X = {"x0_25": 0.25, "x0_5": 0.5, "x0_75": 0.75, "x1_0": 1.0}
_V1 = _widths("MobileNetV1", _X, "MobileNetV1")
_V2 = _widths("MobileNetV2", {**_X, "x1_5": 1.5, "x2_0": 2.0}, "MobileNetV2")
_V3X = {"x0_35": 0.35, "x0_5": 0.5, "x0_75": 0.75, "x1_0": 1.0, "x1_25": 1.25}
_V3 = {f"MobileNetV3_{size}_{suffix}": (f"mobilenet_v3_{size}", w)
       for size in ("large", "small") for suffix, w in _V3X.items()}
_RESNETS = ("18", "34", "50", "101", "152")


def _guide_models() -> dict[str, Callable[[int], nn.Module]]:
    tv = torchvision.models.get_model
    reg: dict[str, Callable[[int], nn.Module]] = {}
    for depth in _RESNETS:
        reg[f"ResNet{depth}"] = lambda n, d=depth: tv(f"resnet{d}", weights=None, num_classes=n)
        # ResNet-D (He et al. 2019, "Bag of Tricks", arXiv:1812.01187) = timm's resnet*d
        reg[f"ResNet{depth}_vd"] = lambda n, d=depth: _timm(f"resnet{d}d", n)
    for name, w in _V1.items():
        reg[name] = lambda n, w=w: MobileNetV1(n, scale=w)
    for name, w in _V2.items():
        reg[name] = lambda n, w=w: tv("mobilenet_v2", weights=None, num_classes=n, width_mult=w)
    for name, (arch, w) in _V3.items():
        reg[name] = lambda n, a=arch, w=w: tv(a, weights=None, num_classes=n, width_mult=w)
    return reg


def _timm(name: str, num_classes: int) -> nn.Module:
    try:
        import timm
    except ImportError:  # a dependency (setup.py); say how to fix a broken environment
        raise ValueError(f"model {name!r} needs timm: pip install timm") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


# Our own families; everything else comes from torchvision / timm by name.
_OWN: dict[str, Callable[[int], nn.Module]] = {
    "resnet_tiny": lambda num_classes: TinyResNet(num_classes),
    **_guide_models(),
}
GUIDE_MODELS = sorted(k for k in _OWN if k != "resnet_tiny")
TIMM_PREFIX = "timm:"


@lru_cache(maxsize=1)
def model_names() -> list[str]:
    """Every valid `model.name` except the open-ended `timm:<name>` (listed as `timm:<name>`)."""
    tv = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(_OWN) | set(tv)) + [f"{TIMM_PREFIX}<name>"]


def is_model_name(name: str) -> bool:
    """Cheap check for config validation: timm names are checked when the model is built."""
    if name.startswith(TIMM_PREFIX):
        return len(name) > len(TIMM_PREFIX)
    return name in model_names()


def build_model(name: str, num_classes: int, *, blurpool: bool = False,
                zero_init_residual: bool = False) -> nn.Module:
    """Randomly initialized model `name` with a `num_classes`-way classifier; `blurpool`
    and `zero_init_residual` as model.blurpool / model.zero_init_residual (ValueError when
    the model has nothing they apply to)."""
    if name in _OWN:
        model = _OWN[name](num_classes)
    elif name.startswith(TIMM_PREFIX):
        model = _timm(name[len(TIMM_PREFIX):], num_classes)
    elif not is_model_name(name):
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(model_names())}")
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if zero_init_residual and zero_init_last_bn(model) == 0:
        raise ValueError(f"model.zero_init_residual: {name} has no residual blocks "
                         f"(torchvision BasicBlock/Bottleneck or timm zero_init_last)")
    if blurpool and apply_blurpool(model) == 0:
        raise ValueError(f"model.blurpool: {name} has no stride-2 convolution with >= 16 input "
                         f"channels to blur")
    fp32_logits(model, num_classes)
    return model


class _Fp32Head:
    """The classifier layer in fp32 under autocast: its input is cast up and autocast is off
    for its matmul, so the logits are fp32 (bf16's 8 mantissa bits tie top logits: at 2.1,
    neighbouring bf16 values are 0.016 apart). Outside autocast (fp32 runs, export, tracing)
    the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class Fp32Linear(_Fp32Head, nn.Linear):
    pass


class Fp32Conv2d(_Fp32Head, nn.Conv2d):
    pass


def fp32_logits(model: nn.Module, num_classes: int) -> bool:
    """Make `model`'s classifier (`classifier()`: an nn.Linear or nn.Conv2d) compute in fp32
    under autocast, in place: its class becomes Fp32Linear/Fp32Conv2d (the same parameters,
    state_dict keys and forward outside autocast). False when the classifier is of another
    type (left as it is)."""
    try:
        head = classifier(model, num_classes)
    except ValueError:
        return False
    for fp32 in (Fp32Linear, Fp32Conv2d):
        if type(head) is fp32.__mro__[2]:  # exactly nn.Linear / nn.Conv2d, not a subclass
            head.__class__ = fp32
            return True
    return isinstance(head, _Fp32Head)


def zero_init_last_bn(model: nn.Module) -> int:
    """Zero the last BN gamma of every residual block, so each block starts as the identity
    (Goyal et al. 2017, arXiv:1706.02677, §5.1): exactly torchvision's
    `resnet(zero_init_residual=True)` for its BasicBlock/Bottleneck (ResNet, ResNeXt, Wide
    ResNet) and timm's `zero_init_last()` for the blocks that define it (timm's ResNets, ...).
    Draws no random numbers. Returns the number of blocks changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.bn3.weight is not None:
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
            nn.init.zeros_(m.bn2.weight)
        elif callable(getattr(m, "zero_init_last", None)):
            m.zero_init_last()
        else:
            continue
        n += 1
    return n


class BlurPoolConv2d(nn.Conv2d):
    """A Conv2d that first low-pass filters its input (Zhang 2019, "Making convolutional
    networks shift-invariant again", arXiv:1904.11486) as ffcv-imagenet's BlurPoolConv2d:
    per channel, the 3x3 binomial filter [1,2,1]x[1,2,1]/16, zero padding 1, stride 1, then
    the convolution with its own stride. Same parameters and state_dict keys as the Conv2d it
    replaces (the filter is a non-persistent buffer), so checkpoints load into plain models.

    Written here rather than wrapping timm's BlurPool2d: that one is a separate module that
    also subsamples (reflect padding by default), which would change the module tree and the
    state_dict keys; tests/test_fast.py checks this blur equals BlurPool2d(stride=1,
    pad_mode='constant')."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "BlurPoolConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta")  # meta: no init, no random numbers drawn; the weights are conv's
        new.weight, new.bias = conv.weight, conv.bias
        taps = torch.tensor([1.0, 2.0, 1.0], device=conv.weight.device)
        filt = (taps[:, None] * taps[None, :] / 16.0).to(conv.weight.dtype)
        new.register_buffer("blur_filter", filt.expand(conv.in_channels, 1, 3, 3).contiguous(),
                            persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter, stride=1, padding=1, groups=self.in_channels)
        return super().forward(x)


def apply_blurpool(model: nn.Module) -> int:
    """ffcv-imagenet's rule: every Conv2d with a stride > 1 and >= 16 input channels becomes
    a BlurPoolConv2d (in a torchvision ResNet-50: the stride-2 3x3 convs and 1x1 downsample
    convs of layer2-4; the 3-channel stem conv is left alone). Returns the number replaced."""
    n = 0
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, BlurPoolConv2d) and \
                max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, BlurPoolConv2d.from_conv(child))
            n += 1
        else:
            n += apply_blurpool(child)
    return n


def classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """The final classification layer: timm's `get_classifier()`, else the last Linear or
    Conv2d whose output width is `num_classes` (torchvision `fc`/`classifier[-1]`, ours)."""
    get = getattr(model, "get_classifier", None)
    if callable(get) and isinstance(get(), nn.Module) and any(True for _ in get().parameters()):
        return get()
    found = None
    for m in model.modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or \
                (isinstance(m, nn.Conv2d) and m.out_channels == num_classes):
            found = m
    if found is None:
        raise ValueError(f"no classifier layer with {num_classes} outputs in {type(model).__name__}")
    return found
