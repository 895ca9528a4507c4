"""The data interface contract (fastcls.data.base.Loader) for the native and synthetic backends, and
the crops against torchvision.transforms.v2."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import (BAD_NAMES, CPU, FOLDER_LABELS, bad_folder, bad_names, check_contract,
                      make_folder, write_odd_images)
from conftest import loader_cfg as make_cfg
from fastcls.config import config_from_dict
from fastcls.data import DatasetError, build_loader, scan_folder
from fastcls.data.crop import sample_rrc
from fastcls.data.base import MEAN, STD
from fastcls.data.native import decode_train, decode_val
from fastcls.data.sampler import ShardBatchSampler


# ---------------------------------------------------------------- contract

@pytest.mark.parametrize("workers", [0, 2])
def test_native_contract(folder, workers):
    cfg = make_cfg(folder, folder, workers=workers)
    loader = build_loader(cfg, "train", CPU)
    assert loader.classes == ["a", "b", "c"]
    assert len(loader) == 18 // 4
    check_contract(loader)
    val = build_loader(cfg, "val", CPU, classes=loader.classes)
    labels = torch.cat([y for _, y in val])
    assert labels.tolist() == FOLDER_LABELS  # folder order, every image once


def test_val_batch_equals_normalized_decode(folder):
    cfg = make_cfg(folder, folder)
    val = build_loader(cfg, "val", CPU, classes=["a", "b", "c"])
    x, _ = next(iter(val))
    path = val.dataset.samples[0][0]
    ref = torch.from_numpy(decode_val(path, 32, 36).copy()).permute(2, 0, 1).float()
    ref = (ref - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], ref, rtol=1e-5, atol=1e-5)


def test_labels_follow_folders(tmp_path):
    # Each class folder holds images of one flat colour; the label must name the colour.
    colors = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for name, c in colors.items():
        for i in range(5):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.new("RGB", (50 + i, 40), c).save(tmp_path / name / f"{i}.jpg", quality=95)
    cfg = make_cfg(tmp_path, hflip=0.0)
    loader = build_loader(cfg, "train", CPU)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for x, y in loader:
        rgb = (x * std + mean).mean(dim=(2, 3))  # N×3 in 0..255
        assert rgb.argmax(1).tolist() == [[2, 1, 0][int(k)] for k in y]


def test_set_epoch_reshuffles_and_is_reproducible(folder):
    cfg = make_cfg(folder)
    a, b = build_loader(cfg, "train", CPU), build_loader(cfg, "train", CPU)
    a.set_epoch(3)
    b.set_epoch(3)
    xa, xb = [x for x, _ in a], [x for x, _ in b]
    for u, v in zip(xa, xb):
        torch.testing.assert_close(u, v)  # same epoch, same seed: same crops and order
    a.set_epoch(4)
    assert not all(torch.equal(u, v) for (u, _), v in zip(a, xb))


# ---------------------------------------------------------------- sharding

@pytest.mark.parametrize("n, world, batch", [(100, 2, 8), (37, 3, 4), (10, 4, 1)])
def test_train_shards_disjoint_equal_and_drop_partial(n, world, batch):
    for epoch in range(3):
        shards = []
        for r in range(world):
            s = ShardBatchSampler(n, batch, r, world, train=True, seed=1)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == (n // world) // batch
            assert all(len(b) == batch and all(e == epoch for _, e in b) for b in batches)
            shards.append({i for b in batches for i, _ in b})
        union = set().union(*shards)
        assert sum(map(len, shards)) == len(union)  # disjoint


def test_union_of_first_batches_is_single_process_batch():
    # What makes DDP equal to one process with the global batch.
    single = next(iter(ShardBatchSampler(50, 8, 0, 1, train=True)))
    per_rank = [next(iter(ShardBatchSampler(50, 4, r, 2, train=True))) for r in range(2)]
    assert sorted(single) == sorted(per_rank[0] + per_rank[1])


@pytest.mark.parametrize("n, world, batch", [(18, 2, 4), (37, 3, 4), (5, 4, 2), (3, 4, 2)])
def test_eval_counts_each_image_once(n, world, batch):
    seen = []
    for r in range(world):
        s = ShardBatchSampler(n, batch, r, world, train=False)
        batches = list(s)
        assert len(batches) == len(s)
        seen += [i for b in batches for i, _ in b]
    assert sorted(seen) == list(range(n))


def test_val_loader_two_ranks_cover_once(folder):
    cfg = make_cfg(folder, folder)
    labels = []
    for r in range(2):
        val = build_loader(cfg, "val", CPU, rank=r, world_size=2, classes=["a", "b", "c"])
        labels += [y for _, y in val]
    assert torch.cat(labels).tolist() == FOLDER_LABELS


# ---------------------------------------------------------------- crops vs torchvision

def test_rrc_distribution_matches_torchvision():
    W, H, scale, ratio, n = 500, 375, (0.08, 1.0), (3 / 4, 4 / 3), 4000
    rng = np.random.default_rng(0)
    ours = np.array([sample_rrc(W, H, scale, ratio, rng) for _ in range(n)], dtype=float)
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    ref = np.array([v2.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=float)
    for arr in (ours, ref):
        area = arr[:, 2] * arr[:, 3] / (W * H)
        assert area.min() >= scale[0] * 0.95 and area.max() <= 1.0
    # Compare the distributions of area fraction, log aspect and box centre.
    def stats(a):
        area = a[:, 2] * a[:, 3] / (W * H)
        logr = np.log(a[:, 3] / a[:, 2])
        cx = (a[:, 1] + a[:, 3] / 2) / W
        return np.array([np.quantile(area, q) for q in (0.1, 0.5, 0.9)] +
                        [np.quantile(logr, q) for q in (0.1, 0.5, 0.9)] + [cx.mean(), cx.std()])
    np.testing.assert_allclose(stats(ours), stats(ref), atol=0.03)


def test_rrc_configured_ranges_hold():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        t, l, h, w = sample_rrc(320, 240, (0.35, 1.0), (0.75, 1.3333), rng)
        assert 0 <= t and t + h <= 240 and 0 <= l and l + w <= 320
        assert 0.35 * 0.9 <= h * w / (320 * 240) <= 1.0


def test_rrc_fallback_is_center_crop_with_clamped_ratio():
    # A 1000×10 strip: no box with aspect in [3/4, 4/3] fits, so torchvision's fallback.
    t, l, h, w = sample_rrc(1000, 10, (0.9, 1.0), (0.75, 4 / 3), np.random.default_rng(0))
    assert (h, w) == (10, 13) and t == 0 and l == (1000 - 13) // 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_train_crop_matches_torchvision_resized_crop(tmp_path, fmt):
    # Smooth image so interpolation differences stay small.
    yy, xx = np.mgrid[0:300, 0:400]
    arr = np.stack([xx * 255 / 400, yy * 255 / 300, (xx + yy) * 255 / 700], -1).astype(np.uint8)
    path = tmp_path / f"img.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    for seed in range(20):
        ours = decode_train(str(path), 64, (0.08, 1.0), (0.75, 4 / 3), 0.0, np.random.default_rng(seed))
        t, l, h, w = sample_rrc(400, 300, (0.08, 1.0), (0.75, 4 / 3), np.random.default_rng(seed))
        ref = TF.resized_crop(TF.pil_to_tensor(Image.open(path).convert("RGB")), t, l, h, w, [64, 64],
                              antialias=True)
        diff = (torch.from_numpy(ours.copy()).permute(2, 0, 1).float() - ref.float()).abs()
        # PNG: same pixels, PIL vs torch antialias filters; JPEG: plus DCT-domain downscale.
        assert diff.mean() < (0.5 if fmt == "PNG" else 1.5), (seed, diff.mean())  # a 20 px shift gives ~15


def test_train_crop_flip(tmp_path):
    arr = np.zeros((50, 80, 3), np.uint8)
    arr[:, :40] = 255
    Image.fromarray(arr).save(tmp_path / "x.png")
    flipped = [decode_train(str(tmp_path / "x.png"), 16, (1.0, 1.0), (1.6, 1.6), 1.0, np.random.default_rng(s))
               for s in range(3)]
    plain = [decode_train(str(tmp_path / "x.png"), 16, (1.0, 1.0), (1.6, 1.6), 0.0, np.random.default_rng(s))
             for s in range(3)]
    for f, p in zip(flipped, plain):
        np.testing.assert_array_equal(f, p[:, ::-1])
        assert p[:, 0].mean() > 200 and p[:, -1].mean() < 50


@pytest.mark.parametrize("size", [(200, 150), (150, 200), (1000, 700)])
def test_val_matches_torchvision_resize_center_crop(tmp_path, size):
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([xx * 255 / size[0], yy * 255 / size[1], np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "v.jpg", quality=95)
    ours = torch.from_numpy(decode_val(str(tmp_path / "v.jpg"), 56, 64).copy()).permute(2, 0, 1).float()
    ref = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(56)])(
        TF.pil_to_tensor(Image.open(tmp_path / "v.jpg").convert("RGB"))).float()
    assert (ours - ref).abs().mean() < 1.5  # a 2 px shift of the crop gives ~5


# ---------------------------------------------------------------- odd and bad files

def test_grayscale_cmyk_png_decode_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    write_odd_images([tmp_path / "a"] * 4, rng)
    cfg = make_cfg(tmp_path, tmp_path)
    val = build_loader(cfg, "val", CPU, classes=["a"])
    (x, y), = list(val)
    assert x.shape == (4, 3, 32, 32) and val.bad_files == []
    train = build_loader(cfg, "train", CPU)
    assert [tuple(b.shape) for b, _ in train] == [(4, 3, 32, 32)] and train.bad_files == []


def test_bad_files_counted_and_replaced_in_train(tmp_path):
    root = bad_folder(tmp_path)
    cfg = make_cfg(root, max_bad_fraction=0.5, batch_size=23)
    loader = build_loader(cfg, "train", CPU)
    (x, y), = list(loader)
    assert x.shape[0] == 23  # full batch: failures were replaced
    assert bad_names(loader.bad_files) == BAD_NAMES


def test_bad_files_dropped_in_eval(tmp_path):
    root = bad_folder(tmp_path)
    cfg = make_cfg(root, root, max_bad_fraction=0.5)
    val = build_loader(cfg, "val", CPU, classes=["a", "b"])
    n = sum(y.shape[0] for _, y in val)
    assert n == 20 and len(val.bad_files) == 3


def test_too_many_bad_files_fail_with_names(tmp_path):
    root = bad_folder(tmp_path)
    cfg = make_cfg(root, root, max_bad_fraction=0.0)
    val = build_loader(cfg, "val", CPU, classes=["a", "b"])
    with pytest.raises(DatasetError, match=r"(?s)undecodable files.*max_bad_fraction.*(zero|text|trunc)\.jpg"):
        list(val)


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="data.train: path .* does not exist"):
        scan_folder(str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        scan_folder(str(tmp_path / "flat"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        scan_folder(str(tmp_path / "empty"))
    root = make_folder(tmp_path / "t", classes=("a", "b"), per_class=(2, 2))
    (root / "c").mkdir()
    idx = scan_folder(str(root))
    assert idx.classes == ["a", "b", "c"] and idx.empty_classes == ["c"]
    val = make_folder(tmp_path / "v", classes=("a", "x"), per_class=(1, 1))
    with pytest.raises(DatasetError, match=r"differ from training's: missing \['b', 'c'\], extra \['x'\]"):
        scan_folder(str(val), key="data.val", classes=idx.classes)


def test_synthetic_contract():
    cfg = config_from_dict({"model": {"num_classes": 7}, "data": {"backend": "synthetic", "batch_size": 4,
                                                                  "image_size": 16, "synthetic_images": 40}})
    loader = build_loader(cfg, "train", CPU, world_size=2)
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and int(y.max()) < 7 and math.isfinite(float(x.abs().max()))


@pytest.mark.gpu
def test_native_cuda_contract(folder):
    dev = torch.device("cuda")
    cfg = make_cfg(folder, folder, workers=2)
    loader = build_loader(cfg, "train", dev, dtype=torch.bfloat16)
    check_contract(loader, dtype=torch.bfloat16, device=dev, tol=0.02)  # bf16 rounding
    val = build_loader(cfg, "val", dev, classes=loader.classes)
    assert sum(y.shape[0] for _, y in val) == 18
