"""AutoAugment / RandAugment ops against torchvision.transforms.v2 on the same uint8 input and
magnitude; per-sample op choice; the float round trip."""
import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import InterpolationMode

from fastcls.augment import policy as P

REF = T.AutoAugment()  # its _apply_image_or_video_transform is torchvision's per-op kernel dispatch


def reference(img: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    return REF._apply_image_or_video_transform(img, name, mag, InterpolationMode.NEAREST, REF._fill)


def images(n=6, h=37, w=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    x[0] = x[0] // 4 + 60   # low-contrast image: autocontrast/equalize do real work
    x[1, :, :5] = 255        # saturated rows
    return x


MAGS = {"ShearX": [0.3, -0.17, 0.05], "ShearY": [-0.3, 0.12, 0.0], "TranslateX": [-20.4, 7.9, 0.0],
        "TranslateY": [13.6, -5.2, 1.0], "Rotate": [30.0, -12.0, 7.5], "Brightness": [0.9, -0.5, 0.27],
        "Color": [-0.9, 0.4, 0.63], "Contrast": [0.8, -0.35, 0.1], "Sharpness": [0.9, -0.9, 0.33],
        "Posterize": [8.0, 4.0, 1.0], "Solarize": [1.0, 0.5, 0.37], "AutoContrast": [0.0],
        "Equalize": [0.0], "Invert": [0.0], "Identity": [0.0]}


@pytest.mark.parametrize("name", list(MAGS))
def test_each_op_matches_torchvision(name):
    """Per-sample magnitudes in one batch call == torchvision op by op, bit for bit."""
    x = images()
    n = x.shape[0]
    mags = [MAGS[name][i % len(MAGS[name])] for i in range(n)]
    out = P.apply_ops(x, torch.full((n,), P.OP_INDEX[name]), torch.tensor(mags, dtype=torch.float64))
    ref = torch.stack([reference(x[i], name, mags[i]) for i in range(n)])
    assert out.dtype == torch.uint8 and out.shape == x.shape
    diff = (out.int() - ref.int()).abs()
    assert diff.max() == 0, (name, diff.max(), (diff > 0).float().mean())
    if name not in ("Identity",) and any(m != 0 for m in mags):
        assert not torch.equal(out, x)  # the op did something


def test_mixed_ops_in_one_batch_match_per_sample_reference():
    x = images(n=len(P.OPS))
    names = list(P.OPS)
    mags = [MAGS[k][0] for k in names]
    out = P.apply_ops(x, torch.arange(len(names)), torch.tensor(mags, dtype=torch.float64))
    for i, (k, m) in enumerate(zip(names, mags)):
        d = (out[i].int() - reference(x[i], k, m).int()).abs()
        assert d.max() == 0, k


def test_samples_get_different_ops_and_stream_is_reproducible():
    x = images(n=32, h=24, w=24)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = P.randaugment_u8(x, g(), num_ops=1, magnitude=9, num_magnitude_bins=11)
    b = P.randaugment_u8(x, g(), num_ops=1, magnitude=9, num_magnitude_bins=11)
    assert torch.equal(a, b)
    # Each sample's result equals exactly one of the 14 candidate ops applied to it alone.
    space = T.RandAugment._AUGMENTATION_SPACE
    table, signed = P.magnitude_table(space, 11, 24, 24, "cpu")
    used = set()
    for i in range(x.shape[0]):
        hit = next((k for k in space for sg in ((1, -1) if signed[P.OP_INDEX[k]] else (1,))
                    if torch.equal(a[i], reference(x[i], k, sg * float(table[P.OP_INDEX[k], 9])))), None)
        assert hit is not None, i
        used.add(hit)
    assert len(used) >= 6  # many different ops within one batch


def test_autoaugment_per_sample_policy_choice():
    x = images(n=48, h=20, w=20, seed=3)
    out = P.autoaugment_u8(x, torch.Generator().manual_seed(1), "imagenet")
    changed = (out != x).flatten(1).any(1)
    assert 0 < changed.sum() < 48  # some samples untouched (op probabilities), not all-or-nothing
    outs = [P.autoaugment_u8(x, torch.Generator().manual_seed(s), "imagenet") for s in range(3)]
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="valid choices"):
        P.autoaugment_u8(x, torch.Generator(), "nope")


def test_float_round_trip_and_layout():
    from fastcls.data.base import MEAN, STD
    x = images(n=4, h=16, w=16)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    f = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
    assert torch.equal(P.to_uint8(f), x)
    back = P.from_uint8(x, torch.float32)
    assert back.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(back, f)
    labels = torch.arange(4)
    out, lab = P.randaugment(f, labels, torch.Generator().manual_seed(0), magnitude=5)
    assert out.shape == f.shape and out.dtype == f.dtype and lab is labels
    out, _ = P.autoaugment(f.bfloat16(), labels, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16


@pytest.mark.gpu
def test_ops_on_cuda_equal_cpu():
    x = images(n=len(P.OPS))
    op = torch.arange(len(P.OPS))
    mag = torch.tensor([MAGS[k][0] for k in P.OPS], dtype=torch.float64)
    cpu = P.apply_ops(x, op, mag)
    gpu = P.apply_ops(x.cuda(), op.cuda(), mag.cuda()).cpu()
    # Not bitwise: an op that rounds to uint8 can land on .5 on one device and not the other
    # (CUDA contracts a*b+c into one FMA, the CPU rounds twice), so a pixel may differ by 1;
    # anything more, or more than 1% of the pixels, is a real difference.
    diff = (cpu.float() - gpu.float()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())
    f = P.from_uint8(x.cuda(), torch.bfloat16)
    out, _ = P.randaugment(f, torch.zeros(len(P.OPS), device="cuda"), torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
