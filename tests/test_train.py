"""End to end: the demo reaches its accuracy bar, resume continues exactly, DDP over gloo
equals one process."""
import json
import subprocess

import pytest
import torch
import yaml

from fastcls import checkpoint
from fastcls.train import main

from conftest import PY, ROOT, assert_verdict_stable, make_folder, run_env

TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.demo
def test_demo_reaches_accuracy_bar(demo_cache, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([PY, "-m", "fastcls.train", "pipelines/demo.yaml", f"train.out_dir={out}"],
                          cwd=ROOT, env=run_env(demo_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["epoch"] == 30
    for key in ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                "img_per_s", "data_stall"):
        assert key in rows[-1]
    assert rows[-1]["val_images"] == 200
    assert rows[-1]["val_top1"] > 80.0, rows[-1]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["resolved"]["lr_effective"] == pytest.approx(0.8 * 64 / 256)
    from fastcls.config import load_config
    assert load_config(out / "config.yaml").optim.lr == 0.8  # a run's config is a recipe again
    assert (out / "curves.png").stat().st_size > 10_000
    state = checkpoint.load(out / "last.pt")
    assert state["epoch"] == 30 and len(state["classes"]) == 10
    assert (out / "best.pt").is_file()
    # the header names the data; the fit verdict settles and ends healthy (fastcls/diagnose.py)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("fastcls: demo on "))
    assert "| data: the built-in demo data (" in header, header
    seq = assert_verdict_stable(out, max_changes=2, final="healthy")
    assert seq[0] == "provisional"  # warmup, LR above half its peak: no verdict yet
    assert f"| fit: healthy (gap {rows[-1]['fit_gap']:+.2f}" in proc.stdout


def _small_run(data, out, *extra):
    return main(["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
                 "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
                 "data.workers=0", "train.progress=false", f"train.out_dir={out}",
                 "schedule.name=piecewise", "schedule.milestones=[2]", "schedule.warmup_epochs=1",
                 "schedule.warmup_start_factor=0.1", "train.amp=off", *extra])


@pytest.mark.parametrize("decode", ["workers", "batched"])
def test_run_stops_its_workers_even_when_its_frames_are_kept(tmp_path, monkeypatch, decode):
    """Seen: matplotlib's first import (the curves) stores an exception whose traceback keeps
    train()'s frame, and so its loaders, alive past the return; the workers then stopped only
    in the garbage collector, missed their stop message and held the process's exit ~70 s.
    main() must stop them itself, whatever keeps the loaders alive."""
    import multiprocessing

    from fastcls.log import RunLog
    kept = []
    plot = RunLog.plot

    def plot_and_keep_a_traceback(self):
        try:
            raise ValueError("stored, as a parser's cached error is")
        except ValueError as e:
            kept.append(e)  # e.__traceback__ -> this frame -> f_back: train()'s frame
        return plot(self)

    monkeypatch.setattr(RunLog, "plot", plot_and_keep_a_traceback)
    data = make_folder(tmp_path / "data")
    assert _small_run(data, tmp_path / "o", "train.epochs=1", "data.workers=2",
                      f"data.native_decode={decode}") == 0
    assert kept and multiprocessing.active_children() == []
    kept.clear()


def test_resume_continues_at_right_epoch_and_lr(tmp_path):
    data = make_folder(tmp_path / "data")
    assert _small_run(data, tmp_path / "a", "train.epochs=3") == 0
    assert _small_run(data, tmp_path / "b", "train.epochs=2") == 0
    assert _small_run(data, tmp_path / "b", "train.epochs=3", "train.resume=auto") == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert b[2]["lr"] == pytest.approx(a[2]["lr"]) and a[2]["lr"] == pytest.approx(0.8 * 4 / 256 * 0.1)
    sa, sb = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert sa["step"] == sb["step"] == 3 * 4
    # Same data stream (seeded per epoch and sample) and same state: the same weights.
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-5, atol=1e-6)
    assert b[2]["val_top1"] == pytest.approx(a[2]["val_top1"])


def test_eval_every_and_checkpoint_every_epoch(tmp_path):
    data = make_folder(tmp_path / "data")
    assert _small_run(data, tmp_path / "e", "train.epochs=3", "train.eval_every=2") == 0
    rows = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [2, 3]  # every 2nd epoch and the last
    assert checkpoint.load(tmp_path / "e" / "last.pt")["epoch"] == 3
    assert _small_run(data, tmp_path / "f", "train.epochs=1", "train.eval_every=5") == 0
    assert checkpoint.load(tmp_path / "f" / "last.pt")["epoch"] == 1


def test_resume_path_missing_is_an_error(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    assert _small_run(data, tmp_path / "c", "train.epochs=1", f"train.resume={tmp_path}/nope.pt") == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_dataset_is_one_line_error(tmp_path):
    proc = subprocess.run([PY, "-m", "fastcls.train", "pipelines/resnet50_bs256.yaml", "data.train=/no/such",
                           "data.val=/no/such", f"train.out_dir={tmp_path}"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.train: path '/no/such' does not exist" in proc.stderr


def test_ddp_gloo_equals_single_process(tmp_path):
    data = make_folder(tmp_path / "data", per_class=(6, 6, 6))
    out = tmp_path / "ddp.json"
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "helpers" / "ddp_equivalence.py"), str(data), str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    assert r["lr_ddp"] == r["lr_single"] == pytest.approx(0.1)  # LR follows the global batch
    assert r["moved"] > 1e-3  # the steps did change the weights
    assert r["rank_diff"] == 0.0  # DDP: identical weights on both ranks
    assert r["single_diff"] < 1e-5, r  # and equal to one process on the global batch


@pytest.mark.parametrize("extra", [["train.amp=bf16"], ["train.amp=fp16"],
                                   ["train.amp=bf16", "model.compile=true", "train.ema.decay=0.9"],
                                   ["model.channels_last=false", "augment.label_smoothing=0.1"]])
def test_training_paths(tmp_path, extra):
    """bf16 autocast, fp16 with GradScaler, torch.compile (inductor on CPU; with an EMA, whose
    copy is compiled for evaluation too), NCHW."""
    import math
    data = make_folder(tmp_path / "data")
    assert _small_run(data, tmp_path / "r", "train.epochs=2", *extra) == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    state = checkpoint.load(tmp_path / "r" / "last.pt")
    assert (state["scaler"] is not None) == ("train.amp=fp16" in extra)
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in state["model"])
    if "train.ema.decay=0.9" in extra:
        assert list(state["ema"]) == list(state["model"]) and all("val_top1_ema" in r for r in rows)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["train.amp=bf16"], pytest.param(
    ["train.amp=fp16", "model.compile=true"], marks=pytest.mark.slow)])  # a cold compile: minutes
def test_training_on_gpu(tmp_path, extra):
    data = make_folder(tmp_path / "data")
    assert _small_run(data, tmp_path / "g", "train.epochs=2", "train.device=cuda", "data.workers=2", *extra) == 0
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_images"] == 18


def test_run_turns_cudnn_autotuning_on_unless_deterministic(tmp_path):
    data = make_folder(tmp_path / "data")
    torch.backends.cudnn.benchmark = False
    assert _small_run(data, tmp_path / "a", "train.epochs=1") == 0
    assert torch.backends.cudnn.benchmark is True
    try:
        assert _small_run(data, tmp_path / "b", "train.epochs=1", "train.deterministic=true") == 0
        assert torch.backends.cudnn.benchmark is False
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True


def test_compiled_evaluation_pads_the_last_batch_instead_of_recompiling():
    """A compiled eval model sees one batch shape (the partial last batch is padded, its
    padding dropped) and gives the eager model's numbers."""
    import contextlib

    from fastcls.dist import DistInfo
    from fastcls.train import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    xs = [torch.randn(n, 3, 4, 4).contiguous(memory_format=torch.channels_last) for n in (4, 4, 3)]
    batches = [(x, torch.randint(0, 5, (x.shape[0],))) for x in xs]
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    eager = evaluate(model, batches, contextlib.nullcontext, dist)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    padded = evaluate(torch.compile(model, backend=counting_backend, dynamic=False), batches,
                      contextlib.nullcontext, dist, pad_to=4)
    assert len(graphs) == 1, graphs
    assert padded["val_images"] == eager["val_images"] == 11
    for k in ("val_loss", "val_top1", "val_top5"):
        assert padded[k] == pytest.approx(eager[k], rel=1e-6)
    torch._dynamo.reset()
    graphs.clear()
    evaluate(torch.compile(model, backend=counting_backend, dynamic=False), batches,
             contextlib.nullcontext, dist)
    assert len(graphs) == 2  # without padding the last batch compiles a second graph
