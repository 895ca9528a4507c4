"""The `dali` backend on the CPU (the real DALI graph, `device_id=None`): the data interface
contract, sharding/epochs/seek against the native backend's sampler, crops against
torchvision's RandomResizedCrop, validation against transforms.v2, bad files, the demo."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import (BAD_NAMES, CPU, FOLDER_LABELS, PY, ROOT, bad_folder, bad_names,
                      check_contract, loader_cfg, photo_folder, run_env, unnormalize)
from fastcls.config import load_config
from fastcls.data import DatasetError, build_loader
from fastcls.data.sampler import ShardBatchSampler

pytest.importorskip("nvidia.dali", reason="DALI not installed: pip install 'fastcls[dali]'")
from fastcls.data.dali import DaliSource, build_pipeline  # noqa: E402



def make_cfg(train, val="", **data):
    return loader_cfg(train, val, **{"backend": "dali", "workers": 2, **data})


# ---------------------------------------------------------------- contract

def test_dali_contract(folder):
    cfg = make_cfg(folder, folder)
    loader = build_loader(cfg, "train", CPU)
    assert type(loader).__name__ == "DaliLoader"
    assert loader.classes == ["a", "b", "c"]
    assert len(loader) == 18 // 4
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, _ in check_contract(loader, tol=1e-4):
            assert x.std() > 0.3
    val = build_loader(cfg, "val", CPU, classes=loader.classes)
    assert len(val) == 5  # 18 images: 4 full batches + 2 (the reader's padding dropped)
    shapes = [tuple(x.shape) for x, _ in val]
    assert shapes == [(4, 3, 32, 32)] * 4 + [(2, 3, 32, 32)]
    labels = torch.cat([y for _, y in val])
    assert labels.tolist() == FOLDER_LABELS  # folder order, every image once


def test_dali_fp16_output(folder):
    x, y = next(iter(build_loader(make_cfg(folder), "train", CPU, dtype=torch.float16)))
    assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(build_loader(make_cfg(folder), "train", CPU, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_dali_labels_follow_folders(tmp_path):
    # Each class folder holds images of one flat colour; the label must name the colour.
    colors = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for name, c in colors.items():
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.new("RGB", (50 + i, 40), c).save(tmp_path / name / f"{i}.jpg", quality=95)
    loader = build_loader(make_cfg(tmp_path), "train", CPU)
    seen = 0
    for x, y in loader:
        rgb = unnormalize(x).mean(dim=(2, 3))
        assert rgb.argmax(1).tolist() == [[2, 1, 0][int(k)] for k in y]
        seen += len(y)
    assert seen == 12


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


# ---------------------------------------------------------------- order, shards, epochs

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


def identify(x: torch.Tensor) -> list[int]:
    """Sample ids of a batch from its mean colour (flat images survive crops and flips)."""
    rgb = unnormalize(x).mean(dim=(2, 3))
    table = torch.tensor([_id_color(k) for k in range(216)], dtype=torch.float32)
    d = torch.cdist(rgb, table)
    assert (d.min(1).values < 8).all(), d.min(1).values
    return d.argmin(1).tolist()


def test_dali_order_equals_native_sampler_and_shards_partition(tmp_path):
    root = id_folder(tmp_path / "d", n=48)
    cfg = make_cfg(root, hflip=0.5)
    loaders = [build_loader(cfg, "train", CPU, rank=r, world_size=2) for r in range(2)]
    orders = {}
    for epoch in range(3):
        shards = []
        for r, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            ids = [i for x, _ in loader for i in identify(x)]
            ref = ShardBatchSampler(48, 4, r, 2, train=True, seed=0)
            ref.set_epoch(epoch)
            assert ids == ref.indices().tolist()  # exactly native's order for this rank/epoch
            assert len(ids) == len(loader) * 4 == 24
            shards.append(ids)
        assert not set(shards[0]) & set(shards[1])            # disjoint
        assert sorted(shards[0] + shards[1]) == list(range(48))  # together: the whole set
        orders[epoch] = shards[0]
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


def test_dali_val_two_ranks_each_image_once(tmp_path):
    root = id_folder(tmp_path / "d", n=21)
    cfg = make_cfg(root, root)
    ids = []
    for r in range(2):
        val = build_loader(cfg, "val", CPU, rank=r, world_size=2, classes=["a", "b", "c"])
        batches = list(val)
        assert len(batches) == len(val)
        ids += [i for x, _ in batches for i in identify(x)]
    assert ids == list(range(21))


def test_dali_set_epoch_start_step_seeks(tmp_path):
    root = id_folder(tmp_path / "d", n=40)
    loader = build_loader(make_cfg(root), "train", CPU)
    loader.set_epoch(2)
    full = [identify(x) for x, _ in loader]
    loader.set_epoch(2, start_step=6)
    tail = [identify(x) for x, _ in loader]
    assert len(full) == len(loader) == 10 and tail == full[6:]
    loader.set_epoch(2, start_step=10)
    assert list(loader) == []
    # Same epoch, same seed: the same crops; the seek applied to one iteration only.
    loader.set_epoch(2)
    a = [x for x, _ in loader]
    b = [x for x, _ in loader]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


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
    bs = 250
    source = DaliSource([(str(path), 0)] * n, train=True, batch_size=bs, rank=0, world_size=1,
                        seed=seed, scale=scale, ratio=ratio, hflip=hflip, image_size=S,
                        val_resize=S, base_epoch=0, first_step=0, known_bad={})
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


# ---------------------------------------------------------------- bad files

@pytest.mark.timeout(120)
def test_dali_bad_files_stop_run_with_names(tmp_path):
    root = bad_folder(tmp_path)
    loader = build_loader(make_cfg(root, max_bad_fraction=0.0), "train", CPU)
    with pytest.raises(DatasetError, match=r"(?s)undecodable files.*max_bad_fraction.*"
                                           r"fastcls.tools.check.*(zero|text|trunc)\.jpg"):
        list(loader)


@pytest.mark.timeout(120)
def test_dali_bad_files_replaced_in_train_dropped_in_val(tmp_path):
    root = bad_folder(tmp_path)
    cfg = make_cfg(root, root, max_bad_fraction=0.5, batch_size=23)
    loader = build_loader(cfg, "train", CPU)
    (x, y), = list(loader)
    assert x.shape[0] == 23  # full batch: the failures were replaced by other samples
    assert bad_names(loader.bad_files) == BAD_NAMES
    loader.set_epoch(1)  # known now: replaced up front, still counted for the epoch
    assert [x.shape[0] for x, _ in loader] == [23] and len(loader.bad_files) == 3
    val = build_loader(make_cfg(root, root, max_bad_fraction=0.5), "val", CPU, classes=["a", "b"])
    labels = torch.cat([y for _, y in val])
    assert len(labels) == 20 and bad_names(val.bad_files) == BAD_NAMES
    assert labels.tolist() == [0] * 10 + [1] * 10


@pytest.mark.timeout(120)
def test_dali_bad_files_in_several_batches_all_counted(tmp_path):
    root = bad_folder(tmp_path)
    loader = build_loader(make_cfg(root, max_bad_fraction=0.5), "train", CPU)
    ref = ShardBatchSampler(23, 4, 0, 1, train=True, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        ref.set_epoch(epoch)
        shapes = [tuple(x.shape) for x, _ in loader]
        assert shapes == [(4, 3, 32, 32)] * 5
        used = {loader.samples[i][0].rsplit("/", 1)[1] for i in ref.indices()}
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


def test_dali_missing_says_how_to_install(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if the wheel were not installed
    with pytest.raises(DatasetError, match=r"nvidia.dali is not installed; run: pip install "
                                           r"'fastcls\[dali\]'.*nvidia-dali-cuda130"):
        build_loader(make_cfg(folder), "train", CPU)


# ---------------------------------------------------------------- end to end

@pytest.mark.timeout(900)  # ~1 min on an idle 2-core box; a shared, loaded one needs more
def test_demo_with_dali_reaches_accuracy_bar(demo_cache, tmp_path):
    out = tmp_path / "demo"
    # One torch thread beside DALI's two: on 2 cores, 2 OpenMP threads that spin-wait while
    # DALI decodes the next batch slow the step down many times over on a loaded machine.
    env = dict(run_env(demo_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run([PY, "-m", "fastcls.train", "pipelines/demo.yaml", "data.backend=dali",
                           f"train.out_dir={out}", "train.progress=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["val_images"] == 200
    assert rows[-1]["val_top1"] > 80.0, rows[-1]


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


# ---------------------------------------------------------------- GPU (unverified without one)

@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_graph_defines_without_cuda(train):
    """The GPU graph (decoders on "mixed", hw_decoder_load, paddings, fp16, images on the GPU)
    is defined here: DALI checks every op's arguments and device placement at definition, so
    a wrong name or a CPU op fed a GPU tensor fails on this CPU machine too."""
    source = DaliSource([("x.jpg", 0), ("y.jpg", 1)], train=train, batch_size=2, rank=0,
                        world_size=1, seed=1, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip=0.5,
                        image_size=32, val_resize=36, base_epoch=0, first_step=0, known_bad={})
    pipe = build_pipeline(source, batch_size=2, num_threads=2, device_id=0, seed=1, py_workers=2,
                          hw_decoder_load=0.65, out_fp16=True, build=False)
    outs = getattr(pipe, "_graph_outputs", None)  # private; checked when this DALI has it
    if outs is not None:
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


# ---------------------------------------------------------------- one pipeline, exact crops, no crash

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


def test_dali_mid_epoch_seek_repeats_the_crops_bitwise(tmp_path):
    """The windows and flips come from (seed, epoch, index): a resumed epoch's batches equal
    the uninterrupted epoch's, pixel for pixel."""
    root = photo_folder(tmp_path / "p", per_class=4)
    loader = build_loader(make_cfg(root, hflip=0.5), "train", CPU)
    loader.set_epoch(1)
    full = [x for x, _ in loader]
    fresh = build_loader(make_cfg(root, hflip=0.5), "train", CPU)  # a new process would
    fresh.set_epoch(1, start_step=3)
    tail = [x for x, _ in fresh]
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        assert torch.equal(a, b)


def test_dali_crops_are_the_native_backends_crops(tmp_path):
    """Each training window DALI decodes is the box sample_rrc draws for that sample in the
    native backends (same seed, epoch, index): read back from coordinate-coded images."""
    from fastcls.data.crop import sample_rrc
    W, H, S = 240, 180, 48
    yy, xx = np.mgrid[0:H, 0:W]
    (tmp_path / "a").mkdir()
    for k in range(8):
        Image.fromarray(np.stack([xx, yy, np.full_like(xx, 30 * k)], -1).astype(np.uint8)).save(
            tmp_path / "a" / f"{k}.png")
    cfg = make_cfg(tmp_path, image_size=S, val_resize=S, batch_size=8, hflip=0.5)
    loader = build_loader(cfg, "train", CPU)
    loader.set_epoch(5)
    (x, _), = list(loader)
    pix = unnormalize(x).numpy().astype(np.float64)           # N×3×S×S
    i = np.arange(S) + 0.5
    mid = slice(S // 4, 3 * S // 4)
    ref = ShardBatchSampler(8, 8, 0, 1, train=True, seed=0)
    ref.set_epoch(5)
    for row, idx in enumerate(ref.indices().tolist()):
        assert abs(pix[row, 2].mean() - 30 * idx) < 2            # blue identifies the file
        rng = np.random.default_rng((0, 5, idx))
        top, left, h, w = sample_rrc(W, H, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        flip = rng.random() < 0.5
        sx, x0 = np.polyfit(i[mid], pix[row, 0].mean(0)[mid], 1)  # red = source x
        sy, y0 = np.polyfit(i[mid], pix[row, 1].mean(1)[mid], 1)  # green = source y
        assert (sx < 0) == flip
        assert abs(abs(sx) * S - w) < 2 and abs(sy * S - h) < 2
        assert abs(y0 - top) < 1.5 and abs((x0 + sx * S if flip else x0) - left) < 1.5


def test_dali_spawned_workers_run_the_source(tmp_path):
    """On a GPU the Python workers must be spawned (DALI refuses to fork once CUDA is up):
    the source is pickled into them, which this checks on the CPU."""
    root = id_folder(tmp_path / "d", n=8)
    from fastcls.data import folder
    idx = folder.scan_folder(str(root))
    source = DaliSource(idx.samples, train=True, batch_size=4, rank=0, world_size=1, seed=0,
                        scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip=0.5, image_size=32,
                        val_resize=32, base_epoch=0, first_step=0, known_bad={})
    pipe = build_pipeline(source, batch_size=4, num_threads=1, device_id=None, seed=0,
                          py_workers=1, py_start_method="spawn")
    images, labels, keep, bad = pipe.run()
    assert np.array(images.as_tensor()).shape == (4, 32, 32, 3)
    assert np.array(keep.as_tensor()).all()


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
