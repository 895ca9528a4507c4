"""Model registry: name -> nn.Module.

Names are torchvision's classification models (`resnet50`, `mobilenet_v3_large`, ...)
plus the small families below that no library ships at this size.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock


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


# Our own families; everything else comes from torchvision by name.
_OWN: dict[str, Callable[[int], nn.Module]] = {
    "resnet_tiny": lambda num_classes: TinyResNet(num_classes),
}


@lru_cache(maxsize=1)
def model_names() -> list[str]:
    tv = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(_OWN) | set(tv))


def build_model(name: str, num_classes: int) -> nn.Module:
    """Randomly initialized model `name` with a `num_classes`-way classifier."""
    if name in _OWN:
        return _OWN[name](num_classes)
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(model_names())}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
