"""The `dali` backend on the CPU (the real DALI graph, `device_id=None`): fp16 output, crops
against torchvision's RandomResizedCrop, validation against transforms.v2, bad files, one
pipeline per loader, spawned source workers. Contract, order, seeks, the crops' equality to
the other paths, the broken-file zoo and the demo are the matrix in test_data.py."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fastcls.config import load_config
from fastcls.data import DatasetError, _spec, build_loader
from fastcls.data.folder import FolderSource
from fastcls.data.source import RankOrder

from conftest import (
    BAD_NAMES,
    CPU,
    FOLDER_LABELS,
    PY,
    ROOT,
    bad_folder,
    bad_names,
    check_contract,
    loader_cfg,
    make_folder,
    photo_folder,
    run_env,
    unnormalize,
)

pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install 'fastcls[dali]'")
from fastcls.data.dali import DaliSource, build_pipeline, start_method  # noqa: E402


def make_cfg(train, val="", **data):
    return loader_cfg(train, val, **{"backend": "dali", "workers": 2, **data})


def dali_source(path, split="train", batch_size=4, classes=None, **data) -> DaliSource:
    """A DaliSource over a FolderSource of the folder or list file `path` (make_cfg + `data`)."""
    spec = _spec(make_cfg(path, **data), split, str(path), CPU, batch_size, classes=classes)
    source = FolderSource.open(spec)
    assert isinstance(source, FolderSource)
    return DaliSource(source, spec, base_epoch=0, first_step=0, known_bad={})


# ---------------------------------------------------------------- output

def test_dali_fp16_output(folder):
    x, y = next(iter(build_loader(make_cfg(folder), "train", CPU, dtype=torch.float16)))
    assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(build_loader(make_cfg(folder), "train", CPU, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(200, 150), (150, 200)])
def test_dali_val_matches_torchvision_resize_center_crop(tmp_path, size):
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([xx * 255 / size[0], yy * 255 / size[1], np.full_like(xx, 128)], -1).astype(np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a" / "v.jpg", quality=95)
    cfg = make_cfg(tmp_path, tmp_path, image_size=56, val_resize=64)
    (x, _), = list(build_loader(cfg, "val", CPU, classes=["a"]))
    ours = unnormalize(x)[0]
    ref = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(56)])(
        TF.pil_to_tensor(Image.open(tmp_path / "a" / "v.jpg").convert("RGB"))).float()
    assert (ours - ref).abs().mean() < 1.5  # a 2 px shift of the crop gives ~5


# ---------------------------------------------------------------- helpers

def id_folder(root, n=48, classes=("a", "b", "c")):
    """n flat-colour JPEGs; sample k (in scan order) has colour _id_color(k)."""
    paths = []
    for k in range(n):
        cls = classes[k * len(classes) // n]
        p = root / cls / f"{k:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + k % 7, 48), _id_color(k)).save(p, quality=95)
        paths.append(p)
    return root


def _id_color(k):
    return (20 + 40 * (k % 6), 20 + 40 * ((k // 6) % 6), 20 + 40 * (k // 36))


# ---------------------------------------------------------------- crops vs torchvision

def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max distance between the empirical CDFs)."""
    a, b = np.sort(a), np.sort(b)
    z = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, z, "right") / len(a) -
                        np.searchsorted(b, z, "right") / len(b)).max())


def _measure_crops(tmp_path, n, scale, ratio, hflip=0.0, W=240, H=180, S=48, seed=3):
    """Run the training graph on a PNG whose red channel is x and green is y: from each
    output, a line fit over the central pixels gives the crop window (left, top, w, h) in
    source pixels, and whether it was flipped."""
    yy, xx = np.mgrid[0:H, 0:W]
    path = tmp_path / "ramp.png"
    Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)).save(path)
    lst = tmp_path / "ramp.txt"  # the one image n times (a list file may repeat in training)
    lst.write_text("ramp.png 0\n" * n)
    bs = 250
    source = dali_source(lst, batch_size=bs, hflip=hflip, image_size=S, val_resize=S,
                         rrc={"scale": list(scale), "ratio": list(ratio)})
    assert source.num_samples == n and len(source.order) == n // bs
    pipe = build_pipeline(source, batch_size=bs, num_threads=2, device_id=None, seed=seed,
                          py_workers=2, normalize=False)
    out = np.concatenate([np.array(pipe.run()[0].as_tensor()) for _ in range(n // bs)])
    out = out.astype(np.float64)
    i = np.arange(S) + 0.5  # output pixel centres
    mid = slice(S // 4, 3 * S // 4)  # away from the borders, where filters clamp
    fx = np.array([np.polyfit(i[mid], r[mid], 1) for r in out[..., 0].mean(1)])
    fy = np.array([np.polyfit(i[mid], g[mid], 1) for g in out[..., 1].mean(2)])
    flipped = fx[:, 0] < 0
    w, h = np.abs(fx[:, 0]) * S, fy[:, 0] * S
    return w, h, flipped


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.35, 1.0), (0.6, 1.6))])
def test_dali_crop_distribution_matches_torchvision(tmp_path, scale, ratio):
    W, H, n = 240, 180, 1500
    w, h, flipped = _measure_crops(tmp_path, n, scale, ratio, W=W, H=H)
    assert not flipped.any()
    area, logr = w * h / (W * H), np.log(w / h)
    # Inside the configured ranges (up to the fit's ~1 px error).
    assert area.min() >= scale[0] * 0.95 and area.max() <= scale[1] * 1.03
    assert logr.min() >= np.log(ratio[0]) - 0.03 and logr.max() <= np.log(ratio[1]) + 0.03
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    ref = np.array([v2.RandomResizedCrop.get_params(img, list(scale), list(ratio))
                    for _ in range(n)], dtype=float)  # (top, left, h, w)
    ref_area, ref_logr = ref[:, 2] * ref[:, 3] / (W * H), np.log(ref[:, 3] / ref[:, 2])
    # KS critical value for n = m = 1500 at alpha = 0.001 is 1.95 * sqrt(2 / 1500) = 0.071.
    assert _ks(area, ref_area) < 0.071, (np.quantile(area, [.1, .5, .9]), np.quantile(ref_area, [.1, .5, .9]))
    assert _ks(logr, ref_logr) < 0.071, (np.quantile(logr, [.1, .5, .9]), np.quantile(ref_logr, [.1, .5, .9]))
    # A wrong range is detected: the test can fail.
    assert _ks(area, np.clip(ref_area * 1.3, 0, 1)) > 0.071


def test_dali_flip_probability(tmp_path):
    _, _, flipped = _measure_crops(tmp_path, 500, (0.5, 1.0), (3 / 4, 4 / 3), hflip=0.5)
    assert 0.4 < flipped.mean() < 0.6
    _, _, flipped = _measure_crops(tmp_path, 250, (0.5, 1.0), (3 / 4, 4 / 3), hflip=1.0)
    assert flipped.all()


# ---------------------------------------------------------------- bad files, config

@pytest.mark.timeout(120)
def test_dali_bad_files_stop_run_with_names(tmp_path):
    root = bad_folder(tmp_path)
    loader = build_loader(make_cfg(root, max_bad_fraction=0.0), "train", CPU)
    with pytest.raises(DatasetError, match=r"(?s)undecodable files.*max_bad_fraction.*"
                                           r"fastcls.tools.check.*(zero|text|trunc)\.jpg"):
        list(loader)


@pytest.mark.timeout(120)
def test_dali_bad_files_in_several_batches_all_counted(tmp_path):
    root = bad_folder(tmp_path)
    loader = build_loader(make_cfg(root, max_bad_fraction=0.5), "train", CPU)
    ref = RankOrder(23, 4, 0, 1, train=True, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        shapes = [tuple(x.shape) for x, _ in loader]
        assert shapes == [(4, 3, 32, 32)] * 5
        used = {loader.source.table.path(i).rsplit("/", 1)[1] for i in ref.ids(epoch)}
        expected = sorted(used & set(BAD_NAMES))
        assert expected and bad_names(loader.bad_files) == expected


@pytest.mark.timeout(300)
def test_dali_check_exclude_gives_a_clean_run(tmp_path, capsys):
    """`check --exclude-out` then `data.exclude`: training with dali meets no bad file
    (data.max_bad_fraction=0 would stop the run at the first one)."""
    from fastcls.train import main
    root = bad_folder(tmp_path)
    out = tmp_path / "bad.txt"
    r = subprocess.run([PY, "-m", "fastcls.tools.check", str(root), "--exclude-out", str(out),
                        "--no-progress"], env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(out.read_text().splitlines()) == 3, r.stderr
    run = tmp_path / "run"
    rc = main([str(ROOT / "pipelines" / "demo.yaml"), "data.backend=dali", f"data.train={root}",
               f"data.val={root}", "data.demo=false", "model.num_classes=2", "data.batch_size=4",
               "data.image_size=32", "data.val_resize=32", "data.max_bad_fraction=0.0",
               f"data.exclude={out}", "train.epochs=1", "train.progress=false", "train.amp=off",
               f"train.out_dir={run}"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "skipped 3 listed files" in captured.out + captured.err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_images"] == 20
    # Without the exclusion list the same run stops with the bad files' names, no hang.
    rc = main([str(ROOT / "pipelines" / "demo.yaml"), "data.backend=dali", f"data.train={root}",
               f"data.val={root}", "data.demo=false", "model.num_classes=2", "data.batch_size=4",
               "data.image_size=32", "data.val_resize=32", "data.max_bad_fraction=0.0",
               "train.epochs=1", "train.progress=false", "train.amp=off", f"train.out_dir={run}2"])
    err = capsys.readouterr().err
    assert rc == 2 and "undecodable files" in err and ".jpg" in err and "Traceback" not in err


def test_config_keys():
    cfg = load_config(str(ROOT / "pipelines" / "demo.yaml"),
                      ["data.backend=dali", "data.dali.hw_decoder_load=0.9",
                       "data.dali.prefetch_queue_depth=3"])
    assert cfg.data.dali.hw_decoder_load == 0.9 and cfg.data.dali.prefetch_queue_depth == 3
    from fastcls.config import ConfigError
    with pytest.raises(ConfigError, match=r"data.dali.hw_decoder_load: must be in \[0, 1\]"):
        load_config(None, ["data.batch_size=8", "data.dali.hw_decoder_load=1.5"])
    with pytest.raises(ConfigError, match="data.dali.prefetch_queue_depth: must be > 0"):
        load_config(None, ["data.batch_size=8", "data.dali.prefetch_queue_depth=0"])


def test_dali_threads_are_not_data_workers(folder):
    """DALI's thread count (nvJPEG's paddings are per thread: ~211 MB device + 2 x 140 MB
    pinned each) is data.dali.threads, 0 = 4 capped by the cores; data.workers only sets
    the Python source workers."""
    import os

    from fastcls.data.dali import DEFAULT_THREADS, dali_threads, padding_bytes
    assert DEFAULT_THREADS == 4 and load_config(None, ["data.batch_size=8"]).data.dali.threads == 0
    assert dali_threads(0, cores=2) == 2 and dali_threads(0, cores=64) == 4 and dali_threads(0, cores=1) == 1
    assert dali_threads(6, cores=2) == 6  # an explicit value is taken as it is
    assert padding_bytes(4) == (4 * 211025920, 8 * 140544512)
    cores = len(os.sched_getaffinity(0))
    loader = build_loader(make_cfg(folder, workers=16), "train", CPU)
    assert loader.num_threads == min(4, cores) and loader.workers == 16
    loader = build_loader(make_cfg(folder, workers=2, dali={"threads": 3}), "train", CPU)
    assert loader.num_threads == 3 and loader.workers == 2
    from fastcls.config import ConfigError
    with pytest.raises(ConfigError, match="data.dali.threads"):
        load_config(None, ["data.batch_size=8", "data.dali.threads=-1"])


# ---------------------------------------------------------------- GPU (unverified without one)

@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_graph_defines_without_cuda(tmp_path, train):
    """The GPU graph (decoders on "mixed", hw_decoder_load, paddings, fp16, images on the GPU)
    is defined here: DALI checks every op's arguments and device placement at definition, so
    a wrong name or a CPU op fed a GPU tensor fails on this CPU machine too."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=(1, 1))
    source = dali_source(root, "train" if train else "val", batch_size=2, classes=["a", "b"],
                         val_resize=36)
    pipe = build_pipeline(source, batch_size=2, num_threads=2, device_id=0, seed=1, py_workers=2,
                          hw_decoder_load=0.65, out_fp16=True, build=False)
    # The outputs' devices: DataNodes in `_graph_out` (private; set by set_outputs, while
    # `_graph_outputs` stays None until build). Required, so the check cannot silently lapse.
    outs = getattr(pipe, "_graph_out", None)
    assert outs is not None, "this DALI keeps the graph's outputs elsewhere: update the test"
    assert [o.device for o in outs] == ["gpu", "cpu", "cpu", "cpu"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dali_cuda_contract(folder, dtype):
    dev = torch.device("cuda")
    cfg = make_cfg(folder, folder)
    loader = build_loader(cfg, "train", dev, dtype=dtype)
    batches = check_contract(loader, dtype=dtype, device=dev, tol=0.02)  # fp16/bf16 rounding
    assert len(batches) == 4
    val = build_loader(cfg, "val", dev, dtype=dtype, classes=loader.classes)
    labels = torch.cat([y for _, y in val])
    assert labels.tolist() == FOLDER_LABELS
    # The GPU graph gives the CPU graph's validation images (same resize, other decoder).
    cpu_val = build_loader(cfg, "val", CPU, classes=loader.classes)
    for (xg, _), (xc, _) in zip(val, cpu_val):
        assert (xg.float().cpu() - xc).abs().mean() < 0.05


@pytest.mark.gpu
def test_dali_cuda_bad_file_named(tmp_path):
    root = bad_folder(tmp_path)
    loader = build_loader(make_cfg(root, max_bad_fraction=0.5, batch_size=23), "train",
                          torch.device("cuda"))
    (x, _), = list(loader)
    assert x.shape[0] == 23 and bad_names(loader.bad_files) == BAD_NAMES


# ---------------------------------------------------------------- one pipeline, spawned workers, no crash

def test_dali_builds_one_pipeline_per_loader(tmp_path):
    """3 epochs of training and 3 evaluations: one build each (a build preallocates GBs of
    device and pinned memory on a GPU); a seek (resume) builds at that step."""
    root = id_folder(tmp_path / "d", n=24)
    cfg = make_cfg(root, root)
    train = build_loader(cfg, "train", CPU)
    val = build_loader(cfg, "val", CPU, classes=["a", "b", "c"])
    for epoch in range(3):
        train.set_epoch(epoch)
        assert len(list(train)) == len(train) == 6
        assert torch.cat([y for _, y in val]).shape == (24,)
    assert train.builds == 1 and val.builds == 1
    train.set_epoch(3, start_step=2)
    assert len(list(train)) == 4 and train.builds == 2
    train.set_epoch(4)  # follows the epoch just finished: the same pipeline again
    assert len(list(train)) == 6 and train.builds == 2
    import multiprocessing
    assert multiprocessing.active_children()  # DALI's Python source workers
    train.close()
    val.close()
    assert multiprocessing.active_children() == []  # close(): the pipelines and workers are gone
    train.set_epoch(5)
    assert len(list(train)) == 6 and train.builds == 3  # iterating after close builds again
    train.close()


def test_dali_spawned_workers_run_the_source(tmp_path):
    """On a GPU the Python workers must be spawned (DALI refuses to fork once CUDA is up):
    the source is pickled into them, which this checks on the CPU."""
    root = id_folder(tmp_path / "d", n=8)
    source = dali_source(root, batch_size=4, val_resize=32)
    pipe = build_pipeline(source, batch_size=4, num_threads=1, device_id=None, seed=0,
                          py_workers=1, py_start_method="spawn")
    images, labels, keep, bad = pipe.run()
    assert np.array(images.as_tensor()).shape == (4, 32, 32, 3)
    assert np.array(keep.as_tensor()).all()


@pytest.mark.parametrize("gpu, driver, expected", [(False, False, "fork"), (False, True, "spawn"),
                                                   (True, False, "spawn"), (True, True, "spawn")])
def test_dali_start_method(gpu, driver, expected):
    """Spawn whenever the CUDA driver is up (DALI refuses to fork then), not only for a GPU
    graph: conftest's torch.cuda.is_available() initializes the driver on a GPU machine."""
    assert start_method(gpu, driver) == expected


def test_dali_cpu_graph_spawns_once_the_driver_is_up(tmp_path, monkeypatch):
    """The check is DALI's own (no CUDA here: False, and it initialized nothing); a CPU graph
    built with the driver reported up gets spawned workers."""
    import fastcls.data.dali as dali
    assert dali.cuda_driver_initialized() is False and not torch.cuda.is_initialized()
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=(1, 1))
    source = dali_source(root, batch_size=2)
    kw = dict(batch_size=2, num_threads=1, device_id=None, seed=1, py_workers=1, build=False)
    assert build_pipeline(source, **kw)._py_start_method == "fork"
    monkeypatch.setattr(dali, "cuda_driver_initialized", lambda: True)
    assert build_pipeline(source, **kw)._py_start_method == "spawn"


def _run_pids(marker: str) -> set[int]:
    """Live (not zombie) processes whose command line holds `marker`."""
    import os
    pids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != "Z":
            pids.add(int(d))
    return pids


def _children(pid: int) -> set[int]:
    import os
    kids = set()
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return kids


@pytest.mark.timeout(240)
def test_dali_workers_die_with_a_sigkilled_trainer(tmp_path):
    """kill -9 of the trainer (an OOM kill, scancel's escalation) during epoch 1 on the CPU
    graph with 2 Python workers: no process of the run is left a few seconds later (they were
    re-parented to init and lived on: workers.die_with_parent)."""
    import signal
    import time
    root = make_folder(tmp_path / "d", per_class=(8, 8, 8))  # 12 steps of 2
    out = tmp_path / "sigkill-run-7f3a"  # in every forked worker's command line too
    args = ["pipelines/demo.yaml", "data.backend=dali", f"data.train={root}", f"data.val={root}",
            "data.demo=false", "model.num_classes=3", "data.batch_size=2", "data.image_size=32",
            "data.val_resize=32", "data.workers=2", "train.epochs=20", "train.progress=false",
            "train.amp=off", "train.checkpoint_every=2", f"train.out_dir={out}"]
    proc = subprocess.Popen([PY, "-m", "fastcls.train", *args], cwd=ROOT, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kids, deadline = set(), time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            kids |= _children(proc.pid)
            if (out / "last.pt.sha256").is_file() and len(kids) >= 2:  # steps ran: workers serve
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(kids) >= 2, (kids, proc.stderr.read()[-2000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left = _run_pids(str(out)) | {p for p in kids if p in _run_pids("")}
        end = time.time() + 10
        while left and time.time() < end:
            time.sleep(0.2)
            left = _run_pids(str(out)) | {p for p in kids if p in _run_pids("")}
        assert not left, f"processes of the killed run still alive: {sorted(left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _run_pids(str(out)):  # never leave them behind for the next test
            import os
            os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_dali_html_page_among_real_photos_is_counted_not_a_crash(tmp_path):
    """An HTML error page saved as x.jpeg among real JPEGs, at batch 64 (this crashed the
    process with SIGSEGV inside pipe.run() before files were screened): counted, named."""
    root = photo_folder(tmp_path / "p", per_class=40)  # 240 photos
    (root / "chelsea" / "x.jpeg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    script = (
        "import sys, torch\n"
        "from fastcls.config import config_from_dict\n"
        "from fastcls.data import build_loader\n"
        f"cfg = config_from_dict({{'model': {{'name': 'resnet_tiny', 'num_classes': 6}}, 'data': {{"
        f"'backend': 'dali', 'train': {str(root)!r}, 'val': {str(root)!r}, 'batch_size': 64, "
        f"'image_size': 64, 'val_resize': 72, 'workers': 2}}}})\n"
        "loader = build_loader(cfg, 'train', torch.device('cpu'))\n"
        "for e in range(2):\n"
        "    loader.set_epoch(e)\n"
        "    n = sum(x.shape[0] for x, _ in loader)\n"
        "    print('epoch', e, n, loader.bad_files)\n"
        "val = build_loader(cfg, 'val', torch.device('cpu'), classes=loader.classes)\n"
        "print('val', sum(x.shape[0] for x, _ in val), len(val.bad_files))\n")
    proc = subprocess.run([PY, "-c", script], env=run_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "val 240 1" in proc.stdout and "not an image file" in proc.stdout
