import pytest
import torch
import torch.nn as nn
import torchvision

from fastcls.config import OptimConfig
from fastcls.loss import SmoothedCrossEntropy, smooth_targets
from fastcls.metrics import topk_correct
from fastcls.optim import build_optimizer, param_groups


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_matches_torch_label_smoothing(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 10, (32,), generator=g)
    ours = SmoothedCrossEntropy(10, smoothing)(logits, labels)
    ref = nn.CrossEntropyLoss(label_smoothing=smoothing)(logits.float(), labels)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    g1, = torch.autograd.grad(ours, logits)
    logits2 = logits.detach().float().requires_grad_()
    g2, = torch.autograd.grad(nn.CrossEntropyLoss(label_smoothing=smoothing)(logits2, labels), logits2)
    torch.testing.assert_close(g1.float(), g2, rtol=1e-4, atol=1e-6)


def test_smooth_targets_values():
    t = smooth_targets(torch.tensor([2, 0]), 4, 0.2)
    assert t.sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert t[0].tolist() == pytest.approx([0.05, 0.05, 0.85, 0.05])


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    top1, top5 = topk_correct(logits, labels, (1, 5)).tolist()
    assert top1 == 1 and top5 == 3  # k > classes counts every sample


def test_no_decay_by_structure_catches_downsample_bn():
    model = torchvision.models.resnet18(num_classes=10)
    groups = param_groups(model, 1e-4, no_decay_norm_bias=True)
    no_decay = {id(p) for p in groups[1]["params"]}
    ds_bn = model.layer2[0].downsample[1]  # ffcv-imagenet's "'bn' in name" misses this one
    assert id(ds_bn.weight) in no_decay and id(ds_bn.bias) in no_decay
    assert id(model.fc.bias) in no_decay and id(model.fc.weight) not in no_decay
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 1e-4
    n_all = sum(1 for _ in model.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_all


def test_fused_sgd_matches_reference_sgd():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    m2 = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    m2.load_state_dict(m1.state_dict())
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, no_decay_norm_bias=True)
    opt1 = build_optimizer(cfg, m1, lr=0.05)
    assert opt1.defaults["fused"] is True
    opt2 = torch.optim.SGD(param_groups(m2, 1e-3, True), lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        for m, o in ((m1, opt1), (m2, opt2)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)
