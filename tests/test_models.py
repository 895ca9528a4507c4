"""Every model name builds and runs; the guide's models have their published sizes."""
import pytest
import torch
import torch.nn as nn

from fastcls.config import ConfigError, load_config
from fastcls.models import GUIDE_MODELS, MobileNetV1, build_model, classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", GUIDE_MODELS + ["resnet_tiny", "resnet18", "mobilenet_v3_small",
                                                 "efficientnet_b0", "timm:resnet18d",
                                                 "timm:mobilenetv3_small_050"])
def test_every_model_name_builds_and_runs(name):
    torch.manual_seed(0)
    m = build_model(name, 10).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m.to(memory_format=torch.channels_last)(x)
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    head = classifier(m, 10)
    assert [p.shape[0] for p in head.parameters()][0] == 10


# Published parameter counts with 1000 classes, millions. Sources: PaddleClas model zoo
# (docs/zh_CN/models: ResNet*_vd, MobileNetV2_x*), torchvision's model docs (ResNet18/50,
# MobileNetV2 1.0), TF-slim's MobileNetV1 checkpoints as listed by OpenVINO's model zoo
# (0.25: 0.468M, 0.5: 1.327M, 1001 classes), the MobileNetV1 paper (1.0: 4.2M, 0.75: 2.6M),
# the MobileNetV3 paper (Large 5.4M, Small 2.5M). Tolerance: 2% (figures have 2-4 digits;
# e.g. torchvision's Small is 2.54M vs the paper's 2.5M).
PUBLISHED = {
    "ResNet18": 11.69, "ResNet50": 25.56, "ResNet50_vd": 25.58, "ResNet18_vd": 11.71,
    "MobileNetV1_x0_25": 0.468, "MobileNetV1_x0_5": 1.327, "MobileNetV1_x0_75": 2.6,
    "MobileNetV1": 4.2, "MobileNetV2_x0_25": 1.5, "MobileNetV2": 3.5, "MobileNetV2_x1_5": 6.76,
    "MobileNetV2_x2_0": 11.13, "MobileNetV3_large_x1_0": 5.4, "MobileNetV3_small_x1_0": 2.5,
}


@pytest.mark.parametrize("name, millions", sorted(PUBLISHED.items()))
def test_param_counts_match_published(name, millions):
    assert n_params(build_model(name, 1000)) / 1e6 == pytest.approx(millions, rel=0.02)


def test_resnet_vd_is_resnet_d():
    """ResNet-D (Bag of Tricks §4.1): 3-conv stem and avg-pool before the 1x1 downsample."""
    m = build_model("ResNet50_vd", 10)
    convs = [mod for mod in m.conv1.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3
    down = m.layer2[0].downsample
    assert isinstance(down[0], nn.AvgPool2d) and down[1].stride == (1, 1)
    plain = build_model("ResNet50", 10)
    assert plain.conv1.kernel_size == (7, 7)


def test_mobilenetv1_width_multiplier():
    m = MobileNetV1(1000, scale=0.25)
    assert m.features[0].out_channels == 8 and m.fc.in_features == 256
    # 13 depthwise-separable blocks (depthwise conv has groups == channels)
    dw = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    assert len(dw) == 13 and all(c.groups == c.in_channels for c in dw)


def test_unknown_model_names():
    with pytest.raises(ConfigError, match="unknown model 'ResNet51'"):
        load_config("pipelines/demo.yaml", ["model.name=ResNet51"])
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        build_model("timm:resnet_nope", 10)
    assert load_config("pipelines/demo.yaml", ["model.name=timm:resnet18d"]).model.name == "timm:resnet18d"


@pytest.mark.parametrize("name", ["resnet18", "MobileNetV1_x0_25", "mobilenet_v3_small", "timm:resnet18d"])
def test_logits_are_fp32_under_bf16_autocast_and_the_model_stays_torchvisions(name):
    """The classifier computes in fp32 under autocast (fastcls.models.fp32_logits): bf16
    logits carry 8 mantissa bits and tie; the parameters, state_dict keys and the forward
    outside autocast stay the library's."""
    torch.manual_seed(0)
    m = build_model(name, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32
    if name == "resnet18":  # the same weights in plain torchvision: keys and fp32 outputs equal
        import torchvision
        plain = torchvision.models.resnet18(num_classes=10).eval()
        assert plain.load_state_dict(m.state_dict()) is not None
        with torch.no_grad():
            assert torch.equal(plain(x), m(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = plain(x)
        assert bf16.dtype == torch.bfloat16  # what fp32_logits changes
        # the fp32 head reads the same bf16 features: its logits round to torchvision's
        torch.testing.assert_close(y.to(torch.bfloat16), bf16, atol=0.05, rtol=0.02)
