"""The per-sample decisions (fastcls.data.sample, fastcls.data.source) against
torchvision.transforms.v2: RankOrder's sharding math, the RandomResizedCrop draw, the flip,
the validation window, and the PIL path's decodes; plus folder scanning errors and the
synthetic backend. The per-source x per-path behaviour is the matrix in test_data.py."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fastcls.config import config_from_dict
from fastcls.data import DatasetError, build_loader, scan_folder
from fastcls.data.base import MEAN, STD
from fastcls.data.sample import sample_rrc, train_crop, val_box
from fastcls.data.source import RankOrder
from fastcls.data.workers import decode_train, decode_val
from fastcls.kernels.resized_crop import resize_center_crop_box

from conftest import CPU, make_folder
from conftest import loader_cfg as make_cfg

# ---------------------------------------------------------------- the PIL path

def test_val_batch_equals_normalized_decode(folder):
    cfg = make_cfg(folder, folder)
    val = build_loader(cfg, "val", CPU, classes=["a", "b", "c"])
    x, _ = next(iter(val))
    path = val.source.table.path(0)
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
def test_train_ranks_disjoint_equal_and_drop_partial(n, world, batch):
    for epoch in range(3):
        shards = []
        for r in range(world):
            order = RankOrder(n, batch, r, world, train=True, seed=1)
            order.set_epoch(epoch)
            tasks = list(order)
            assert len(tasks) == len(order) == (n // world) // batch
            assert tasks == [[(epoch, g)] for g in range(len(order))]
            batches = [order.batch(epoch, g) for g in range(len(order))]
            assert all(len(b) == batch for b in batches)
            ids = order.ids(epoch)
            assert ids.tolist() == [int(i) for b in batches for i in b]
            assert len(ids) == order.num_images == len(order) * batch
            shards.append(set(ids.tolist()))
        union = set().union(*shards)
        assert sum(map(len, shards)) == len(union) and union <= set(range(n))  # disjoint
    a, b = RankOrder(n, batch, 0, world, train=True, seed=1), RankOrder(n, batch, 0, world, train=True, seed=1)
    assert a.ids(0).tolist() == b.ids(0).tolist()  # a function of (seed, epoch)
    if len(a.ids(0)) > 1:
        assert a.ids(0).tolist() != a.ids(1).tolist()  # reshuffled per epoch


def test_union_of_first_batches_is_single_process_batch():
    # What makes DDP equal to one process with the global batch.
    single = RankOrder(50, 8, 0, 1, train=True).batch(0, 0)
    per_rank = [RankOrder(50, 4, r, 2, train=True).batch(0, 0) for r in range(2)]
    assert sorted(single.tolist()) == sorted(per_rank[0].tolist() + per_rank[1].tolist())


@pytest.mark.parametrize("n, world, batch", [(18, 2, 4), (37, 3, 4), (5, 4, 2), (3, 4, 2)])
def test_eval_counts_each_image_once(n, world, batch):
    seen = []
    for r in range(world):
        order = RankOrder(n, batch, r, world, train=False)
        tasks = list(order)
        assert len(tasks) == len(order) == -(-order.num_images // batch)
        seen += [int(i) for (e, g), in tasks for i in order.batch(e, g)]
        assert order.ids(5).tolist() == order.ids(0).tolist()  # in order, every epoch
    assert seen == list(range(n))


def test_set_epoch_seeks_one_iteration():
    order = RankOrder(40, 4, 0, 1, train=True)
    order.set_epoch(2, 7)
    assert list(order) == [[(2, g)] for g in range(7, 10)]
    assert list(order) == [[(2, g)] for g in range(10)]  # the seek applies once
    with pytest.raises(ValueError, match="start_step 11 outside"):
        order.set_epoch(0, 11)


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


def test_train_crop_is_sample_rrc_then_an_hflip_draw():
    # The box is sample_rrc's from the same generator; the flip is the generator's next draw.
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    flips = []
    for s in range(4000):
        c = train_crop(500, 375, np.random.default_rng(s), scale, ratio, 0.5)
        rng = np.random.default_rng(s)
        assert (c.top, c.left, c.height, c.width) == sample_rrc(500, 375, scale, ratio, rng)
        assert c.flip == bool(rng.random() < 0.5) and (c.image_height, c.image_width) == (375, 500)
        flips.append(c.flip)
    assert abs(np.mean(flips) - 0.5) < 0.03
    for p, want in ((0.0, False), (1.0, True)):
        assert all(train_crop(500, 375, np.random.default_rng(s), scale, ratio, p).flip == want
                   for s in range(500))


@pytest.mark.parametrize("wh", [(200, 150), (150, 200), (1000, 700), (37, 41), (64, 64)])
@pytest.mark.parametrize("resize, size", [(64, 56), (36, 32), (256, 224)])
def test_val_box_is_torchvision_resize_center_crop(wh, resize, size):
    W, H = wh
    left, top, bw, bh = val_box(W, H, resize, size)
    (t, l, sy, sx), _ = resize_center_crop_box(H, W, resize, size)
    np.testing.assert_allclose([left, top, bw, bh], [l, t, min(size * sx, W), min(size * sy, H)], rtol=1e-12)
    # On a coordinate image (pixel value = its x, resp. y), v2.Resize + CenterCrop samples
    # output pixel j at source x = left + (j + 0.5) * bw / size - 0.5, clamped to the image.
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    ref = v2.Compose([v2.Resize(resize, antialias=False), v2.CenterCrop(size)])(torch.stack([xx, yy]))
    j = torch.arange(size, dtype=torch.float64) + 0.5
    want_x = (left + j * bw / size - 0.5).clamp(0, W - 1)
    want_y = (top + j * bh / size - 0.5).clamp(0, H - 1)
    torch.testing.assert_close(ref[0], want_x.expand(size, size), atol=1e-6, rtol=0)
    torch.testing.assert_close(ref[1], want_y[:, None].expand(size, size), atol=1e-6, rtol=0)


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


# ---------------------------------------------------------------- folders, synthetic

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
