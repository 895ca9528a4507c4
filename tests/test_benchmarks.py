"""Benchmark scripts run to completion on tiny settings (smoke, not timing)."""
import importlib.util
import json
import subprocess

import pytest

from conftest import PY, ROOT, run_env


def test_loader_benchmark_smoke(folder, tmp_path):
    out = tmp_path / "loader.json"
    proc = subprocess.run([PY, "benchmarks/loader.py", "--data", str(folder), "--batch-size", "4",
                           "--image-size", "32", "--workers", "1", "--warmup", "1", "--steps", "3",
                           "--repeats", "2", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    backends = {row["backend"]: row for row in r["results"]}
    assert {"native:workers", "native:batched", "native:workers (shards)", "synthetic",
            "pil_dataloader (baseline)"} <= set(backends)
    if importlib.util.find_spec("pyarrow") is not None:  # the Parquet copy (Hugging Face layout)
        assert "native:workers (parquet)" in backends
    else:
        assert "parquet" in r["skipped"]
    assert backends["pil_dataloader (baseline)"]["ratio_vs_pil"] == 1.0
    assert r["complete"] is True  # (rewritten after each row until then)
    assert r["settings"]["dtype"] == "fp32"  # auto: what training gets (bf16 on CUDA)
    assert backends["native:batched"]["decoder"] in ("nvimgcodec", "torchvision")  # resolved
    for row in r["results"]:
        assert row["img_per_s"] > 0 and len(row["runs"]) == 2
    assert r["machine"]["torch"] and r["settings"]["batch_size"] == 4
    assert "dali" in r["skipped"] or "dali" in backends
    if importlib.util.find_spec("ffcv") is not None:  # both of its .beton forms
        assert {"ffcv (jpg)", "ffcv (raw)"} <= set(backends)
    else:
        assert "ffcv" in r["skipped"]
    assert "img/s" in proc.stdout


def test_loader_benchmark_bad_path(tmp_path):
    proc = subprocess.run([PY, "benchmarks/loader.py", "--data", str(tmp_path / "none")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


# --------------------------------------------------------------------------- make_jpegs.py

def _bench_module(name: str):
    """Import benchmarks/NAME.py (the folder is not a package; scripts import `common`)."""
    import importlib
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_make_jpegs_is_imagenet_like():
    """Statistics over 150 images: the documented size, bytes, 4:2:0 and grayscale share."""
    import io

    from PIL import Image, JpegImagePlugin

    mj = _bench_module("make_jpegs")
    facts, gray, sampling = [], 0, set()
    for i in range(150):
        data, f = mj.make_image(0, i)
        facts.append(f)
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.size == (f["w"], f["h"]) and im.format == "JPEG"
        if im.mode == "L":
            gray += 1
        else:
            assert im.mode == "RGB"
            sampling.add(JpegImagePlugin.get_sampling(im))
    kpx = sum(f["w"] * f["h"] for f in facts) / len(facts) / 1000
    kb = sum(f["bytes"] for f in facts) / len(facts) / 1024
    assert 150 <= kpx <= 230, kpx            # ~500x375 = 188 kpx
    assert 90 <= kb <= 130, kb               # ~110 KB
    assert sampling == {2}                   # PIL's code for 4:2:0
    assert 1 <= gray <= 12 and gray == sum(f["gray"] for f in facts)
    assert len({(f["w"], f["h"]) for f in facts}) > 20   # mixed sizes ...
    assert any(f["w"] < f["h"] for f in facts) and any(f["w"] > f["h"] for f in facts)  # ... and aspects
    assert mj.make_image(0, 7)[0] == mj.make_image(0, 7)[0] != mj.make_image(1, 7)[0]


def test_make_jpegs_folder(tmp_path):
    """ImageFolder layout readable by fastcls and torchvision; same bytes for any worker
    count; a rerun writes nothing; a different set in the same folder is refused."""
    import torchvision

    from fastcls.data import scan_folder

    def run(out, *extra):
        return subprocess.run([PY, "benchmarks/make_jpegs.py", "--out", str(out), "--classes", "3",
                               "--per-class", "4", "--val-per-class", "2", *extra],
                              cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "--workers", "1").returncode == 0
    p = run(b, "--workers", "2")
    assert p.returncode == 0, p.stderr
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"] and ma["images"] == 18
    for key in ("avg_width", "avg_height", "avg_kbytes", "grayscale", "quality", "subsampling"):
        assert key in ma
    assert len(scan_folder(str(a / "train"), key="t").samples) == 12
    assert len(torchvision.datasets.ImageFolder(str(a / "val"))) == 6
    rerun = run(a)
    assert rerun.returncode == 0 and "already written" in rerun.stdout
    other = run(a, "--seed", "1")
    assert other.returncode == 2 and "another benchmark set" in other.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("x")
    assert run(tmp_path / "c").returncode == 2
    flat = subprocess.run([PY, "benchmarks/make_jpegs.py", "--out", str(tmp_path / "f"), "--flat",
                           "--count", "5", "--workers", "1"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert flat.returncode == 0 and len(list((tmp_path / "f").glob("*.jpg"))) == 5


# --------------------------------------------------------------------------- train.py

TRAIN_TINY = ["model.name=resnet_tiny", "data.demo=false", "data.image_size=32", "data.val_resize=32",
              "data.batch_size=4", "data.workers=1", "train.device=cpu"]


def test_train_benchmark_smoke(folder, tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([PY, "benchmarks/train.py", "pipelines/demo.yaml", f"data.train={folder}",
                           *TRAIN_TINY, "--warmup", "1", "--steps", "2", "--repeats", "2",
                           "--note", "smoke", "--out", str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["benchmark"] == "train" and r["note"] == "smoke"
    assert r["machine"]["device_name"].startswith("CPU") and r["machine"]["cpu_cores"] >= 1
    v = r["versions"]
    assert v["torch"] and v["torchvision"] and v["pillow"] and "dali" in v and "ffcv" in v
    assert r["settings"] == {"model": "resnet_tiny", "batch_size": 4, "image_size": 32, "amp": "bf16",
                             "channels_last": True, "compile": False, "backend": "native",
                             "workers": 1, "deterministic": False, "cudnn_benchmark": True,
                             "warmup": 1, "steps": 2, "repeats": 2}
    assert r["config"]["data"]["train"] == str(folder) and r["config"]["model"]["num_classes"] == 10
    assert r["dataset"]["images"] == 18
    rows = {row["backend"]: row for row in r["results"]}
    assert list(rows) == ["synthetic", "native"]
    for row in rows.values():
        assert row["img_per_s"] > 0 and 0 <= row["data_stall_pct"] <= 100
        assert len(row["runs_img_per_s"]) == len(row["runs_data_stall_pct"]) == 2
        assert row["img_per_s"] in row["runs_img_per_s"] and row["epochs_started"] >= 1
    # 18 images = 4 batches of 4 per epoch; 1 + 2x2 steps cross an epoch end
    assert rows["native"]["epochs_started"] == 2
    assert r["ratio_real_vs_synthetic"] == rows["native"]["img_per_s"] / rows["synthetic"]["img_per_s"]
    assert "x synthetic" in proc.stdout


def test_train_benchmark_errors(folder, tmp_path, capsys):
    tb = _bench_module("train")
    out = tmp_path / "t.json"

    def run(*args):
        rc = tb.main(["pipelines/demo.yaml", *TRAIN_TINY, *args, "--out", str(out)])
        return rc, capsys.readouterr().err
    rc, err = run(f"data.train={tmp_path / 'none'}")
    assert rc == 2 and "does not exist" in err
    rc, err = run(f"data.train={folder}", "model.num_classes=2")
    assert rc == 2 and "model.num_classes=3" in err
    rc, err = run(f"data.train={folder}", "optim.lrr=1")
    assert rc == 2 and "optim.lrr" in err
    rc, err = run(f"data.train={folder}", "data.batch_size=32")  # 18 images
    assert rc == 2 and "fewer than one global batch" in err
    assert not out.exists()


@pytest.mark.parametrize("deterministic", [False, True])
def test_train_benchmark_sets_the_trainers_determinism(tmp_path, monkeypatch, capsys, deterministic):
    """benchmarks/train.py calls the trainer's set_determinism (cuDNN autotuning as the
    trainer has it: the synthetic and real numbers are the trainer's), before anything runs."""
    tb = _bench_module("train")
    calls = []
    monkeypatch.setattr(tb, "set_determinism", calls.append)
    rc = tb.main(["pipelines/demo.yaml", *TRAIN_TINY, f"data.train={tmp_path / 'none'}",
                  f"train.deterministic={str(deterministic).lower()}", "--out", str(tmp_path / "t.json")])
    assert rc == 2 and calls == [deterministic]
    import torch

    from fastcls.train import set_determinism
    before = torch.backends.cudnn.benchmark
    try:
        set_determinism(False)  # what the benchmark now records as settings.cudnn_benchmark
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_train_benchmark_measures_stall():
    """The harness reports what the loader costs: a loader that blocks SLEEP s per batch in
    front of a ~free model: the stall is at least the sleep's share of the measured time,
    and img/s cannot exceed one batch per SLEEP."""
    import time
    from types import SimpleNamespace

    import torch

    SLEEP = 0.15
    tb = _bench_module("train")
    from fastcls.config import load_config
    from fastcls.dist import DistInfo
    from fastcls.log import RunLog

    class SlowLoader:  # the one thing the test controls: how long next() blocks
        bad_files: list = []

        def __init__(self):
            self.x, self.y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)

        def set_epoch(self, e):
            pass

        def epoch_warnings(self):
            return []

        def __iter__(self):
            for _ in range(3):
                time.sleep(SLEEP)
                yield self.x, self.y

    cfg = load_config("pipelines/demo.yaml", ["train.device=cpu", "model.channels_last=false"])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    from fastcls.train import EpochContext
    ctx = EpochContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       scaler=None, criterion=torch.nn.CrossEntropyLoss(), lr_at=lambda s: 0.1,
                       autocast=__import__("contextlib").nullcontext, augmenter=None, cfg=cfg,
                       dist=DistInfo(0, 0, 1, torch.device("cpu")), log=RunLog("unused", enabled=False))
    args = SimpleNamespace(warmup=1, steps=5, repeats=1)
    row = tb.run_backend("slow", SlowLoader(), ctx, args)
    elapsed = 5 * 4 / row["img_per_s"]
    assert row["img_per_s"] <= 4 / SLEEP, row
    assert 100 * 5 * SLEEP / elapsed * 0.98 <= row["data_stall_pct"] <= 100, row
    assert row["epochs_started"] == 2  # 1 + 5 steps over 3-batch epochs


# --------------------------------------------------------------------------- table.py

def test_benchmarks_page_table_is_generated_from_results():
    """docs/benchmarks.md's performance tables equal the generator's output over
    benchmarks/results/."""
    proc = subprocess.run([PY, "benchmarks/table.py", "--check"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    table = _bench_module("table")
    results = table.load_results()
    assert results, "benchmarks/results/ holds no JSON"
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for name, r in results:
        assert name == table.canonical_name(r)  # files are named by what they hold
        assert f"`{name}`" in page
        for row in r["results"]:
            if row["backend"] != "synthetic" or r["benchmark"] == "train":
                assert f"{row['img_per_s']:,.0f}" in page


def test_table_check_detects_drift(tmp_path):
    """--add files a result under its canonical name; a page that no longer matches the
    results fails --check until --write regenerates it."""
    import shutil
    results, page = tmp_path / "results", tmp_path / "benchmarks.md"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    shutil.copy(ROOT / "docs" / "benchmarks.md", page)
    src = sorted(results.glob("*_train_*.json"))[0]
    r = json.loads(src.read_text())
    r["time"] = "2031-01-02T03:04:05Z"
    r["results"][-1]["img_per_s"] = 123456.0
    new = tmp_path / "new.json"
    new.write_text(json.dumps(r))

    def table(*args):
        return subprocess.run([PY, "benchmarks/table.py", "--results", str(results),
                               "--page", str(page), *args],
                              cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert table("--check").returncode == 0
    assert table("--add", str(new)).returncode == 0
    assert (results / src.name.replace("2026-11-26", "2031-01-02")).is_file()
    stale = table("--check")
    assert stale.returncode == 1 and "123,456" in stale.stdout
    assert table("--write").returncode == 0 and table("--check").returncode == 0
    assert "| 2031-01-02 |" in page.read_text() and "123,456" in page.read_text()


# --------------------------------------------------------------------------- device_check.sh

STEPS = ["env", "make_jpegs", "kernels", "loader_224", "train_resnet50_eager",
         "train_resnet50_dali", "train_resnet18_eager", "pytest_gpu", "train_resnet50_compiled",
         "pytest_gpu_rest", "pytest_gpu_slow"]


def test_device_check_smoke(tmp_path):
    """The GPU-machine script's every step, tiny and on the CPU; JSON under $OUT."""
    script = ROOT / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    out = tmp_path / "out"
    env = dict(run_env(), OUT=str(out), PYTHON=PY, BUDGET_S="900")
    proc = subprocess.run(["bash", str(script), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["smoke"] is True and s["failed"] == [] and s["device"].startswith("CPU")
    assert [st["step"] for st in s["steps"]] == STEPS
    assert all(st["rc"] == 0 for st in s["steps"])
    assert json.loads((out / "env.json").read_text())["versions"]["torch"]
    assert (out / "pytest_gpu.xml").is_file() and (out / "pytest_gpu_rest.xml").is_file()
    # every test outcome, written as the test ended (the gpu tests skip on a CPU)
    tests = [json.loads(x) for x in (out / "tests.jsonl").read_text().splitlines()]
    assert tests and all(t["outcome"] == "skipped" for t in tests)
    assert s["tests"]["failed"] == 0 and s["tests"]["skipped"] == len(tests) and s["cut"] == []
    assert s["status"] == "measured, 0 tests failed" and proc.stdout.rstrip().endswith(s["status"])
    loader = json.loads((out / "loader_224.json").read_text())
    assert {"native:workers", "pil_dataloader (baseline)"} <= {r["backend"] for r in loader["results"]}
    assert loader["dataset"]["name"].startswith("make_jpegs")
    kernels = json.loads((out / "kernels.json").read_text())
    assert [r["impl"] for r in kernels["results"]] == ["fused torch reference", "per-image torch loop"]
    assert kernels["complete"] is True
    assert kernels["mean_abs_diff_vs_loop_255"] < 1.0   # the fused kernel agrees with the loop
    for name, backend in (("resnet50_eager", "native"), ("resnet50_dali", "dali"),
                          ("resnet18_eager", "native"), ("resnet50_compiled", "native")):
        t = json.loads((out / f"train_{name}.json").read_text())
        assert [r["backend"] for r in t["results"]] == ["synthetic", backend]
        assert t["ratio_real_vs_synthetic"] > 0 and t["complete"] is True
    assert json.loads((out / "train_resnet50_compiled.json").read_text())["settings"]["compile"]
    assert "failed steps: none" in proc.stdout


def test_device_check_full_commands_are_valid(tmp_path):
    """DRY_RUN=1 prints the GPU run's commands: every option exists in the script it is
    passed to and every train.py override loads against its recipe (a typo there would
    only show on the lent machine)."""
    import shlex

    from fastcls.config import load_config

    out = tmp_path / "out"
    env = dict(run_env(), OUT=str(out), PYTHON="python3", DRY_RUN="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = dict(line.split(": ", 1) for line in (out / "commands.txt").read_text().splitlines())
    assert list(cmds) == STEPS
    seen_models = set()
    for name, line in cmds.items():
        argv = shlex.split(line)
        if argv[0] != "python3":
            continue
        script = argv[1]
        source = (ROOT / script).read_text()
        for tok in argv[2:]:
            if tok.startswith("--"):
                assert f'"{tok}"' in source, f"{name}: {script} has no option {tok}"
        if script == "benchmarks/kernels.py":
            assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--size") + 1] == "224"
        if script == "benchmarks/loader.py":
            assert argv[argv.index("--device") + 1] == "cuda" and "--out" in argv
        if script == "benchmarks/train.py":
            overrides = [t for t in argv[3:] if "=" in t and not t.startswith("--")
                         and argv[argv.index(t) - 1] not in ("--out", "--note")]
            cfg = load_config(argv[2], overrides)
            assert cfg.data.image_size == 224 and cfg.train.amp == "bf16" and cfg.model.channels_last
            assert cfg.train.device == "auto" and cfg.data.workers == 16
            assert cfg.data.backend == ("dali" if name.endswith("_dali") else "native"), name
            seen_models.add((cfg.model.name, cfg.data.global_batch_size, cfg.model.compile))
            assert argv[argv.index("--out") + 1] == str(out / f"{name}.json")
    assert seen_models == {("resnet50", 256, False), ("resnet18", 512, False), ("resnet50", 256, True)}
    # The plan: every step with its limit, in running order, fitting one 600 s device call
    # with >= 30 s of it never planned (start-up, summary, transfers).
    plan = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("plan: ")
            and not line.startswith(f"plan: {len(STEPS)} steps")]
    assert [name for name, _ in plan] == STEPS
    limits = {name: int(limit.rstrip("s")) for name, limit in plan}
    assert sum(limits.values()) <= 540 - 30, limits
    assert "(30s kept as slack)" in proc.stdout
    assert list(limits)[:2] == ["env", "make_jpegs"] and list(limits)[-1] == "pytest_gpu_slow"
    # The GPU tests by value: the data path's (kernels, batched, loaders, shards, DALI) before
    # the compiled run, the rest (augment, optimizers, compile, inference) after it.
    first, rest = shlex.split(cmds["pytest_gpu"]), shlex.split(cmds["pytest_gpu_rest"])
    assert first[2] == 'gpu_tests "gpu and not slow" "$OUT/pytest_gpu.xml" "$@"'
    assert first[4:] == ["tests/test_kernels.py", "tests/test_batched.py", "tests/test_data.py",
                         "tests/test_shards.py", "tests/test_dali.py"]
    assert STEPS.index("pytest_gpu") < STEPS.index("train_resnet50_compiled") < STEPS.index("pytest_gpu_rest")
    # every test file with a gpu test is in one of the two lists (a new one is not dropped)
    gpu_files = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                 if p.name != "test_benchmarks.py" and "pytest.mark.gpu" in p.read_text()}
    assert gpu_files <= set(first[4:]) | set(rest[4:]), gpu_files - set(first[4:]) - set(rest[4:])
    assert not set(first[4:]) & set(rest[4:])


def test_table_reads_results_of_the_older_loader_json():
    """loader.json written before benchmarks/common.py (no device_name, dataset, versions)
    still renders and gets a canonical name, so other branches' results can be filed."""
    table = _bench_module("table")
    old = {"benchmark": "loader", "time": "2026-11-26T10:00:00",
           "machine": {"host_cpu": "x86_64", "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
           "settings": {"image_size": 224, "batch_size": 256, "workers": 16}, "folder": "/d/train",
           "results": [{"backend": "dali", "img_per_s": 30000.0, "ratio_vs_pil": 7.5},
                       {"backend": "pil_dataloader (baseline)", "img_per_s": 4000.0, "ratio_vs_pil": 1.0}]}
    assert table.canonical_name(old) == "2026-11-26_nvidia-h100-80gb-hbm3_loader_224px_train.json"
    text = table.render([("x.json", old)])
    assert "| 2026-11-26 | NVIDIA H100 80GB HBM3 | train | 224 | 256 | 16 | dali | 30,000 | 7.50 | `x.json` |" in text


def test_table_memory_benchmark_smoke(tmp_path):
    """benchmarks/table_memory.py on 20,000 list lines: the table holds no Python object per
    sample (bytes + int64 offsets + int64 labels) and the workers copied none of its pages
    over the epoch but the buffers' edges (the full 1.28 M-line numbers are in docs/data.md)."""
    out = tmp_path / "tm.json"
    proc = subprocess.run([PY, "benchmarks/table_memory.py", "--n", "20000", "--out", str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    t = r["table"]
    assert t["samples"] == 20000 and t["offsets_bytes"] == t["labels_bytes"] + 8 == 8 * 20001
    assert t["nbytes"] == t["blob_bytes"] + t["offsets_bytes"] + t["labels_bytes"]
    assert r["epoch"]["images"] == 20000 // 256 * 256
    assert len(r["workers"]) == 2
    # A buffer's first and last page can hold other heap objects that a worker writes to: up
    # to 2 pages for each of the 3 buffers; a table that workers copy would lose most of them.
    for w in r["workers"]:
        assert w["table_pages"] > 100 and w["table_pages_exclusive_end"] <= 6, w


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pip install 'fastcls[parquet]'")
def test_parquet_memory_benchmark_smoke(tmp_path):
    """benchmarks/parquet_memory.py on 100 MB then 300 MB of Parquet: with 3x the data (each
    worker reads ~100 MiB more), a worker's private memory at the end of the epoch stays
    within the allocators' slack (measured -20..+30 MiB): it keeps a few row groups, and
    the memory-mapped files are the shared page cache, not the worker's memory."""
    out = tmp_path / "pm.json"
    proc = subprocess.run([PY, "benchmarks/parquet_memory.py", "--gb", "0.1,0.3", "--shuffle-buffer", "100",
                           "--out", str(out)], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    small, big = json.loads(out.read_text())["runs"]
    read = (big["data"]["bytes_on_disk"] - small["data"]["bytes_on_disk"]) / 2**20 / 2  # more per worker
    assert read > 90 and big["row_groups_kept_per_worker"] == 3 and len(big["workers"]) == 2
    end = {name: sorted(w["private_dirty_kb_end"] / 1024 for w in run["workers"])
           for name, run in (("small", small), ("big", big))}
    for a, b in zip(end["small"], end["big"]):
        assert b - a < 45 < read / 2, end  # holding what it read: +read
    assert big["epoch"]["images"] == big["epoch"]["batches"] * 256 > 0


def test_host_feed_benchmark_smoke(folder, tmp_path):
    """benchmarks/host_feed.py on a tiny folder: every figure the issue names, per batch size,
    positive, with the implied per-core ceiling."""
    out = tmp_path / "hf.json"
    proc = subprocess.run([PY, "benchmarks/host_feed.py", "--data", str(folder), "--batch-sizes", "4,8",
                           "--batches", "2", "--repeats", "2", "--out", str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    want = {f"batched.{side}_us_per_image@{bs}" for side in ("main", "worker") for bs in (4, 8)}
    if importlib.util.find_spec("nvidia.dali") is not None:
        want |= {"dali.worker_us_per_image@4", "dali.worker_us_per_image@8"}
    assert set(r["results"]) == want and all(v > 0 for v in r["results"].values())
    for row in r["rows"]:  # the ceiling is 1e6 / us per image (us stored rounded to 0.01)
        assert abs(row["img_per_s_per_core"] * row["us_per_image"] / 1e6 - 1) < 0.01, row
    assert r["machine"]["device"] == "cpu" and "us/image" in proc.stdout
