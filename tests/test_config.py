import json
import subprocess

import pytest
import yaml

from fastcls.config import ConfigError, load_config, resolve, scaled_lr

from conftest import PY, ROOT, run_env

PIPES = ROOT / "pipelines"


def cfg(*overrides, path=PIPES / "imagenet_bs4096.yaml"):
    return load_config(path, list(overrides))


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'. Did you mean 'lr'?"),
    ("optimm.lr=0.1", "unknown key 'optimm'"),
    ("optim.lr=-0.1", "optim.lr: must be > 0"),
    ("optim.lr=abc", "optim.lr: expected a number"),
    ("data.image_size=1.5", "data.image_size: expected an integer"),
    ("model.channels_last=1", "model.channels_last: expected true/false"),
    ("data.rrc.scale=[0.0,1.0]", "data.rrc.scale: must satisfy 0 < min <= max <= 1"),
    ("data.rrc.scale=[0.5,1.2]", "data.rrc.scale"),
    ("data.rrc.scale=0.5", "data.rrc.scale: expected a list of 2 values"),
    ("data.backend=dal", "valid choices: native, synthetic, dali, ffcv"),
    ("optim.name=adamm", "optim.name: unknown name 'adamm'; valid choices: sgd"),
    ("schedule.name=cos", "valid choices: cosine, piecewise, constant"),
    ("train.amp=fp8", "valid choices: bf16, fp16, off"),
    ("model.name=resnet51", "model.name: unknown model 'resnet51'; valid choices:"),
    ("schedule.milestones=[60,30]", "schedule.milestones: must be increasing"),
    ("augment.label_smoothing=1.5", "augment.label_smoothing: must be in [0, 1]"),
    ("data.val_resize=100", "data.val_resize (100) must be >= data.image_size"),
    ("noequals", "expected section.key=value"),
    # choices and ranges stated on the fields (fastcls.schema.check_fields)
    ("augment.gridmask.mode=2", "augment.gridmask.mode: unknown name 2; valid choices: 0, 1"),
    ("data.ffcv.order=sequential", "data.ffcv.order: unknown name 'sequential'; valid choices: random, quasi_random"),
    ("schedule.milestones=[0,30]", "schedule.milestones[0]: must be > 0, got 0"),
    ("optim.betas=[-0.1,0.9]", "optim.betas[0]: must be in [0, 1), got -0.1"),
    ("data.rrc.ratio=[2.0,1.0]", "data.rrc.ratio: must satisfy 0 < min <= max, got [2.0, 1.0]"),
    ("augment.mixup.cutmix_minmax=[0.5,0.5]", "must satisfy 0 < min < max <= 1, got [0.5, 0.5]"),
    ("augment.hide_and_seek.grid_sizes=[16,-1]", "augment.hide_and_seek.grid_sizes[1]: must be >= 0"),
    ("data.batch_size=0", "data.batch_size: must be > 0, got 0"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be > 0"),
    ("data.workers=-1", "data.workers: must be >= 0"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        cfg(override)
    assert needle in str(e.value)
    assert "imagenet_bs4096.yaml" in str(e.value) or "override" in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 0.1\n  wieght_decay: 1e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'optim.wieght_decay'.*weight_decay"):
        load_config(p, ["data.batch_size=8"])


def test_yaml_strings_coerced_by_field_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 5e-5\n  weight_decay: 1e-4\ndata:\n  batch_size: 32\n  image_size: 1e2\n")
    c = load_config(p)
    assert c.optim.lr == 5e-5 and isinstance(c.optim.lr, float)
    assert c.data.image_size == 100 and isinstance(c.data.image_size, int)
    assert c.name == "c"


def test_overrides_parse_yaml_values():
    c = cfg("data.rrc.scale=[0.35,1.0]", "optim.lr=0.2", "model.compile=true", "schedule.milestones=[10, 20]")
    assert c.data.rrc.scale == (0.35, 1.0)
    assert c.optim.lr == 0.2 and c.model.compile is True and c.schedule.milestones == [10, 20]


def test_batch_override_replaces_the_recipes_other_batch_key(tmp_path):
    c = cfg("data.batch_size=64")  # the recipe names global_batch_size
    assert c.data.batch_size == 64 and c.data.global_batch_size is None
    p = tmp_path / "both.yaml"
    p.write_text("data:\n  batch_size: 8\n  global_batch_size: 16\n")
    with pytest.raises(ConfigError, match="set exactly one of data.batch_size"):
        load_config(p)


def test_bare_off_means_off():
    assert cfg("train.amp=off").train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp: unknown name 'on'"):
        cfg("train.amp=on")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("pipelines/nope.yaml")


@pytest.mark.parametrize("world", [1, 2, 8, 16])
def test_global_batch_fixes_optimization(world):
    c = cfg()
    r = resolve(c, world, train_images=1_281_167)
    assert r.global_batch_size == 4096 and r.batch_size == 4096 // world
    assert r.lr == pytest.approx(1.6)
    assert r.steps_per_epoch == (1_281_167 // world) // (4096 // world)


def test_global_batch_must_divide():
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        resolve(cfg(), 3)


def test_per_process_batch_scales_lr_with_world():
    c = cfg("data.global_batch_size=null", "data.batch_size=128")
    assert resolve(c, 1).lr == pytest.approx(0.05)
    assert resolve(c, 8).lr == pytest.approx(0.4)
    assert resolve(c, 8).global_batch_size == 1024


def test_scaling_rules():
    c = cfg("optim.lr_scaling=sqrt").optim
    assert scaled_lr(c, 1024) == pytest.approx(0.1 * 2)
    assert scaled_lr(cfg("optim.lr_scaling=none").optim, 1024) == pytest.approx(0.1)


@pytest.mark.parametrize("world", ["8", "16"])
def test_print_config_cli(world):
    out = subprocess.run([PY, "-m", "fastcls.train", str(PIPES / "imagenet_bs4096.yaml"), "--print-config",
                          "--world-size", world], capture_output=True, text=True, env=run_env(), check=True)
    tree = yaml.safe_load(out.stdout)
    assert tree["resolved"]["lr_effective"] == pytest.approx(1.6)
    assert tree["resolved"]["global_batch_size"] == 4096
    assert tree["resolved"]["batch_size_per_process"] == 4096 // int(world)
    assert tree["optim"]["lr"] == 0.1 and tree["data"]["rrc"]["scale"] == [0.08, 1.0]


def test_print_config_counts_steps(folder):
    out = subprocess.run([PY, "-m", "fastcls.train", str(PIPES / "resnet50_bs256.yaml"), "--print-config",
                          f"data.train={folder}", "data.global_batch_size=4"],
                         capture_output=True, text=True, env=run_env(), check=True)
    r = yaml.safe_load(out.stdout)["resolved"]
    assert r["train_images"] == 18 and r["steps_per_epoch"] == 4 and r["total_steps"] == 4 * 120


def test_cli_config_error_is_one_line():
    out = subprocess.run([PY, "-m", "fastcls.train", str(PIPES / "demo.yaml"), "optim.lr=-1"],
                         capture_output=True, text=True, env=run_env())
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "optim.lr: must be > 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_all_pipelines_load():
    for p in PIPES.glob("*.yaml"):
        load_config(p)


# ---------------------------------------------------------------- the demo recipe on one's own folders

def test_demo_recipe_with_own_folders_prints_their_count(folder):
    """`pipelines/demo.yaml data.train=... data.val=...` resolves to the given folder (18
    images), not the demo's 1,000, and says that data.demo went off."""
    out = subprocess.run([PY, "-m", "fastcls.train", str(PIPES / "demo.yaml"), "--print-config",
                          f"data.train={folder}", f"data.val={folder}", "data.batch_size=4"],
                         capture_output=True, text=True, env=run_env(), check=True)
    tree = yaml.safe_load(out.stdout)
    assert tree["data"]["demo"] is False and tree["data"]["train"] == str(folder)
    assert tree["resolved"]["train_images"] == 18 and tree["resolved"]["steps_per_epoch"] == 4
    assert "data.demo is off" in out.stderr


def test_demo_recipe_with_own_folders_trains_on_them(folder, tmp_path, capsys):
    from fastcls.train import main
    rc = main([str(PIPES / "demo.yaml"), f"data.train={folder}", f"data.val={folder}",
               "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
               "data.workers=0", "train.epochs=1", "train.progress=false", "train.amp=off",
               f"train.out_dir={tmp_path / 'run'}"])
    assert rc == 0
    assert "data.demo is off" in capsys.readouterr().out
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["demo"] is False and resolved["resolved"]["train_images"] == 18
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_images"] == 18  # the folder's images, not the demo's 200


@pytest.mark.parametrize("where", ["file", "overrides"])
def test_demo_and_folders_together_is_an_error(tmp_path, where):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  demo: true\n  batch_size: 8\n" + ("  train: /d/train\n" if where == "file" else ""))
    extra = ["data.demo=true", "data.train=/d/train"] if where == "overrides" else []
    with pytest.raises(ConfigError, match=r"data.demo: true trains on the demo dataset.*data.demo=false"):
        load_config(p, extra)


def test_demo_kept_when_only_other_keys_are_overridden():
    notes = []
    c = load_config(PIPES / "demo.yaml", ["optim.lr=0.4"], notes)
    assert c.data.demo is True and notes == []


# ---------------------------------------------------------------- the schema: one truth per knob

def _leaf_fields(cls, prefix=""):
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_knob_has_help_text():
    from fastcls.config import Config
    missing = [key for key, f in _leaf_fields(Config) if not f.metadata.get("help")]
    assert missing == []


def test_modules_read_their_choices_from_the_schema():
    import typing

    from fastcls import config
    from fastcls.augment import erase, mix, policy
    from fastcls.data import BUILDERS, batched, ffcv_loader
    assert tuple(BUILDERS) == config.BACKENDS == typing.get_args(config.Backend)
    assert mix.MIX_MODES is config.MIX_MODES and erase.FILL_MODES is config.FILL_MODES
    assert tuple(policy.POLICIES) == config.AUTOAUGMENT_POLICIES
    assert set(batched.ANTIALIAS_ABOVE) == set(config.ANTIALIAS_MODES)
    assert not hasattr(ffcv_loader, "ORDERS")  # data.ffcv.order's choices live on the field only
