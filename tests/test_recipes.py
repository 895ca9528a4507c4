"""Every recipe under pipelines/ loads; the guide's experiment pairs differ only in the
knob under study; docs/recipes.md maps every guide recipe."""
import pytest

from fastcls.config import load_config, resolve, to_dict

from conftest import ROOT

PIPES = sorted((ROOT / "pipelines").rglob("*.yaml"))
GUIDE = ROOT / "pipelines" / "guide"


@pytest.mark.parametrize("path", PIPES, ids=[str(p.relative_to(ROOT)) for p in PIPES])
def test_every_pipeline_loads(path):
    cfg = load_config(path)
    res = resolve(cfg, 1 if cfg.data.global_batch_size is None else
                  max(1, cfg.data.global_batch_size // 512))
    assert res.lr > 0


def _tree(name):
    return to_dict(load_config(GUIDE / f"{name}.yaml"))


def _diff(a, b, prefix=""):
    out = set()
    for k in a:
        if isinstance(a[k], dict):
            out |= _diff(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b[k]:
            out.add(f"{prefix}{k}")
    return out


@pytest.mark.parametrize("a, b, knob, values", [
    ("mobilenetv1_x0_25_l2_1e-4", "mobilenetv1_x0_25_l2_3e-5", "optim.weight_decay", (1e-4, 3e-5)),
    ("resnet50_randaugment_l2_1e-4", "resnet50_randaugment_l2_7e-5", "optim.weight_decay", (1e-4, 7e-5)),
    ("resnet50_vd_ls0.0", "resnet50_vd_ls0.1", "augment.label_smoothing", (0.0, 0.1)),
    ("resnet18_ls0.0", "resnet18_ls0.1", "augment.label_smoothing", (0.0, 0.1)),
    ("mobilenetv2_x0_25_scale0.08", "mobilenetv2_x0_25_scale0.2", "data.rrc.scale", ([0.08, 1.0], [0.2, 1.0])),
])
def test_guide_pairs_differ_only_in_the_knob(a, b, knob, values):
    ta, tb = _tree(a), _tree(b)
    assert _diff(ta, tb) == {"name", knob}

    def get(t):
        for part in knob.split("."):
            t = t[part]
        return t
    assert (get(ta), get(tb)) == values


def test_guide_headline_recipes():
    std = load_config(GUIDE / "resnet50_piecewise.yaml")
    assert (std.optim.lr, std.schedule.name, std.schedule.milestones, std.train.epochs) == \
        (0.1, "piecewise", [30, 60, 90], 120)
    big = load_config(GUIDE / "resnet50_bs8192_warmup5.yaml")
    assert resolve(big, 32).lr == pytest.approx(3.2) and big.schedule.warmup_epochs == 5
    assert load_config(GUIDE / "resnet50_cosine.yaml").train.epochs == 200
    ft = load_config(GUIDE / "finetune_small.yaml")
    assert ft.optim.lr == 0.001 and ft.model.freeze_epochs == 1


def test_docs_map_every_guide_recipe():
    readme = (ROOT / "docs" / "recipes.md").read_text()
    for p in GUIDE.glob("*.yaml"):
        assert f"guide/{p.name}" in readme, p.name
