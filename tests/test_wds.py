"""Tar shards (fastcls/data/shards.py, `convert --to wds`): the layout read back by webdataset's
own reader, the epoch plan's sharding, the loader against the folder backend (same images
per epoch, each val image once), exact resume without replay, pipe: URLs, bad members,
torchrun over gloo, and the demo trained from shards."""
import gc
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (CPU, PY, ROOT, check_contract, loader_cfg, run_env, unnormalize,
                      write_odd_images)
from fastcls.data import DatasetError, build_loader, split_size
from fastcls.data import wds
from fastcls.tools.convert import convert_wds, parse_size
from fastcls.data.wds import ShardPlan, open_shards

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
N = 48  # index_folder's images: 2 ranks x batch 4 x 6 steps, nothing dropped


def index_folder(root: Path, per_class=(16, 16, 16)) -> Path:
    """Solid-colour PNGs whose colour encodes the sample index in scan order (R + 256 G):
    crops and flips keep the colour, so a batch tells which images it holds."""
    i = 0
    for c, n in zip("abc", per_class):
        (root / c).mkdir(parents=True)
        for k in range(n):
            arr = np.zeros((20 + k % 5, 24, 3), np.uint8)
            arr[..., 0], arr[..., 1], arr[..., 2] = i % 256, i // 256, 77
            Image.fromarray(arr).save(root / c / f"{k:02d}.png")
            i += 1
    return root


def ids(x: torch.Tensor) -> list[int]:
    rgb = unnormalize(x[:, :, 0, 0].reshape(-1, 3, 1, 1)).round().long().view(-1, 3)
    return (rgb[:, 0] + 256 * rgb[:, 1]).tolist()


def epoch_ids(loader, epoch, start=0) -> list[int]:
    loader.set_epoch(epoch, start)
    return [i for x, _ in loader for i in ids(x)]


def free(*loaders):
    """Shut DataLoader workers down now (not at exit, which a worker outlives by 30 s)."""
    del loaders
    gc.collect()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(folder, shard dir): index_folder's 48 images in 7 shards of 7 (the last 6)."""
    tmp = tmp_path_factory.mktemp("wds")
    folder = index_folder(tmp / "train")
    convert_wds(str(folder), str(tmp / "shards"), per_shard=7, workers=1, progress=False)
    return folder, tmp / "shards"


# ---------------------------------------------------------------- writing

def test_layout_read_back_by_webdataset(data):
    import webdataset
    folder, shards = data
    meta = json.loads((shards / "train.shards.json").read_text())
    assert meta["format"] == "fastcls-wds-v1" and meta["classes"] == ["a", "b", "c"]
    assert meta["num_samples"] == N and [s["count"] for s in meta["shards"]] == [7] * 6 + [6]
    assert sorted(p.name for p in shards.iterdir()) == [f"train-{k:06d}.tar" for k in range(7)] + \
        ["train.shards.json"]
    urls = [str(shards / s["name"]) for s in meta["shards"]]
    got = list(webdataset.WebDataset(urls, shardshuffle=False))  # the reference reader
    assert len(got) == N
    for s in got:  # original bytes, the class as ASCII, the key from the path
        cls, name = s["__key__"].split("/")
        assert s["png"] == (folder / cls / f"{name}.png").read_bytes()
        assert int(s["cls"]) == "abc".index(cls)
    assert [s["__key__"] for s in got] != sorted(s["__key__"] for s in got)  # shuffled once
    for entry, url in zip(meta["shards"], urls):  # each offset is a sample's first header
        with open(url, "rb") as f:
            for k, off in enumerate(entry["offsets"]):
                f.seek(off)
                name = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape").name
                assert name.endswith(".cls")  # TarWriter writes cls before png
    mine = [s.key.split(":")[1] for u in urls for s in wds.iter_shard(u)]
    assert mine == [s["__key__"] for s in got]


def test_shard_size_in_bytes(tmp_path):
    folder = index_folder(tmp_path / "d")
    assert parse_size("1GB") == 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500kb") == 500_000
    with pytest.raises(DatasetError, match="--shard-size"):
        parse_size("big")
    meta = convert_wds(str(folder), str(tmp_path / "s"), shard_size="10KB", workers=1, progress=False)
    assert len(meta["shards"]) > 3 and sum(s["count"] for s in meta["shards"]) == N
    assert all(s["bytes"] <= 10_000 + 10_240 for s in meta["shards"])  # + the tar end blocks
    r = subprocess.run([PY, "-m", "fastcls.tools.convert", "--to", "wds", str(folder), str(tmp_path / "t"),
                        "--per-shard", "20", "--no-progress", "--prefix", "x"],
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 shards" in r.stdout and (tmp_path / "t" / "x.shards.json").is_file()


def test_convert_skips_bad_files_and_replaces_old_shards(tmp_path):
    from conftest import bad_folder
    root = bad_folder(tmp_path)
    write_odd_images([root / "a", root / "a", root / "b", root / "b"], np.random.default_rng(0))
    out = tmp_path / "s"
    meta = convert_wds(str(root), str(out), per_shard=5, workers=1, progress=False,
                       max_bad_fraction=0.2)
    assert meta["num_samples"] == 20 + 4 and len(meta["skipped"]) == 3  # odd ones kept
    assert sorted(s.split(":")[0].rsplit("/", 1)[1] for s in meta["skipped"]) == \
        ["text.jpg", "trunc.jpg", "zero.jpg"]
    assert len(list(out.glob("*.tar"))) == 5
    convert_wds(str(root), str(out), per_shard=50, workers=1, progress=False, max_bad_fraction=0.2)
    assert sorted(p.name for p in out.iterdir()) == ["d-000000.tar", "d.shards.json"]  # stale gone
    with pytest.raises(DatasetError, match=r"(?s)3 of 27 files.*--max-bad-fraction=0.01"):
        convert_wds(str(root), str(tmp_path / "u"), workers=1, progress=False)
    assert list((tmp_path / "u").iterdir()) == []  # nothing written


# ---------------------------------------------------------------- the plan

@pytest.mark.parametrize("counts, world, batch, streams", [
    ([7] * 6 + [6], 2, 4, 1), ([7] * 6 + [6], 2, 4, 3), ([5, 1, 9, 13, 2], 3, 2, 2),
    ([100], 4, 8, 2), ([3, 3, 3, 3, 3, 3, 3, 3], 2, 5, 4), ([1] * 37, 3, 4, 1)])
def test_plan_shards_disjoint_equal_and_val_once(counts, world, batch, streams):
    n = sum(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for epoch in (0, 1):
        seen, shard_sets = [], []
        for r in range(world):
            p = ShardPlan(counts, batch, r, world, train=True, seed=3, streams=streams,
                          shuffle_buffer=6)
            assert len(p) == (n // world) // batch and p.num_images == len(p) * batch
            pos = [(s, m) for g in range(len(p)) for s, m in zip(*p.batch_positions(epoch, g))]
            assert len(pos) == p.num_images == len(set(pos))
            seen += [starts[s] + m for s, m in pos]
            # a contiguous run of the epoch's shard sequence, starting at r * (n // world)
            order = list(p.shard_order(epoch))
            at = np.concatenate([[0], np.cumsum(np.asarray(counts)[order])])
            t = sorted(int(at[order.index(s)] + m) for s, m in pos)
            assert t == list(range(r * (n // world), r * (n // world) + p.num_images))
            shard_sets.append({s for s, _ in pos})
        assert len(seen) == len(set(seen))  # disjoint ranks
        if max(counts) <= n // world:  # then only neighbours share a shard, at most one
            for a in range(world):
                for b in range(a + 1, world):
                    assert len(shard_sets[a] & shard_sets[b]) <= (1 if b == a + 1 else 0)
        val = []
        for r in range(world):
            p = ShardPlan(counts, batch, r, world, train=False, streams=streams)
            assert len(p) == -(-p.num_images // batch)
            val += [starts[s] + m for g in range(len(p)) for s, m in zip(*p.batch_positions(epoch, g))]
        assert sorted(val) == list(range(n))  # every image exactly once


def test_plan_shuffle_order_and_buffer_bound():
    p = ShardPlan([50] * 4, 5, 0, 1, train=True, seed=0, shuffle_buffer=16)
    a, b = p.shard_order(0), p.shard_order(1)
    assert sorted(a) == [0, 1, 2, 3] and not np.array_equal(a, b)
    order = p.stream_order(0, 0)
    assert sorted(order) == list(range(200)) and not np.array_equal(order, np.arange(200))
    # a sample waits for at most shuffle_buffer later ones: read cursor - sample < 16
    cursor = np.maximum.accumulate(order)
    assert (cursor - order).max() < 16
    assert np.array_equal(ShardPlan([50] * 4, 5, 0, 1, train=True, shuffle_buffer=0).stream_order(0, 0),
                          np.arange(200))


# ---------------------------------------------------------------- the loader

@pytest.mark.parametrize("workers", [0, 2])
def test_contract_and_same_images_per_epoch_as_folder(data, workers):
    folder, shards = data
    per_epoch = {}
    for src in (folder, shards):
        cfg = loader_cfg(src, src, workers=workers, **({"wds": {"shuffle_buffer": 10}} if src == shards else {}))
        loaders = [build_loader(cfg, "train", CPU, rank=r, world_size=2) for r in range(2)]
        assert [len(x) for x in loaders] == [6, 6] and loaders[0].dataset_size == N
        check_contract(loaders[0])
        for epoch in (1, 2):
            per_rank = [epoch_ids(x, epoch) for x in loaders]
            assert not set(per_rank[0]) & set(per_rank[1])  # disjoint ranks
            per_epoch[(str(src), epoch)] = per_rank
        free(*loaders)
    for epoch in (1, 2):  # every image once per epoch, on both backends
        a = sum(per_epoch[(str(shards), epoch)], [])
        assert sorted(a) == sorted(sum(per_epoch[(str(folder), epoch)], [])) == list(range(N))
    assert per_epoch[(str(shards), 1)] != per_epoch[(str(shards), 2)]  # reshuffled
    cfg = loader_cfg(shards, workers=workers, wds={"shuffle_buffer": 10})
    again = build_loader(cfg, "train", CPU, rank=1, world_size=2)
    assert epoch_ids(again, 2) == per_epoch[(str(shards), 2)][1]  # reproducible per (seed, epoch)
    free(again)


def test_labels_and_val_each_image_once(data):
    _, shards = data
    cfg = loader_cfg(shards, shards)
    seen = []
    for r in range(2):
        val = build_loader(cfg, "val", CPU, rank=r, world_size=2, classes=["a", "b", "c"])
        for x, y in val:
            for i, label in zip(ids(x), y.tolist()):
                assert label == i // 16  # index_folder: 16 images per class, in class order
                seen.append(i)
    assert sorted(seen) == list(range(N))


# The three decode paths over shards: the PIL workers, the batched path (batch decode + the
# fused kernel) with each decoder, and DALI (read by position in its Python workers).
PATHS = ["workers", "batched:torchvision",
         pytest.param("batched:nvimgcodec", marks=pytest.mark.skipif(
             __import__("importlib").util.find_spec("nvidia.nvimgcodec") is None, reason="no nvImageCodec")),
         pytest.param("dali", marks=pytest.mark.skipif(
             __import__("importlib").util.find_spec("nvidia.dali") is None, reason="no DALI"))]


def path_cfg(path: str, train, val="", **data):
    if path == "dali":
        return loader_cfg(train, val, backend="dali", **data)
    decode, *decoder = path.split(":")
    return loader_cfg(train, val, native_decode=decode, **({"decoder": decoder[0]} if decoder else {}), **data)


@pytest.mark.parametrize("path", PATHS)
def test_every_decode_path_reads_the_plans_samples(data, path):
    """Batched and DALI read shards in the PIL-worker path's order (the same plan for the same
    data.workers): the same images per rank and epoch; validation scores each image once; a
    mid-epoch seek continues with the uninterrupted epoch's batches, bit for bit."""
    _, shards = data
    kw = dict(workers=2, wds={"shuffle_buffer": 10})
    ref = [build_loader(path_cfg("workers", shards, **kw), "train", CPU, rank=r, world_size=2)
           for r in range(2)]
    got = [build_loader(path_cfg(path, shards, **kw), "train", CPU, rank=r, world_size=2)
           for r in range(2)]
    check_contract(got[0])
    for epoch in (1, 2):
        for r in range(2):
            assert epoch_ids(got[r], epoch) == epoch_ids(ref[r], epoch)
    free(*ref)
    seen = []
    for r in range(2):
        val = build_loader(path_cfg(path, shards, shards, **kw), "val", CPU, rank=r, world_size=2,
                           classes=["a", "b", "c"])
        for x, y in val:
            for i, label in zip(ids(x), y.tolist()):
                assert label == i // 16
                seen.append(i)
        free(val)
    assert sorted(seen) == list(range(N))
    got[0].set_epoch(3)
    full = [x for x, _ in got[0]]
    got[0].set_epoch(3, 4)
    rest = [x for x, _ in got[0]]
    assert len(rest) == len(full) - 4 and all(torch.equal(u, v) for u, v in zip(rest, full[4:]))
    free(*got)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_and_does_not_replay(data, workers, monkeypatch):
    _, shards = data
    cfg = loader_cfg(shards, workers=workers, batch_size=2, wds={"shuffle_buffer": 5})
    loader = build_loader(cfg, "train", CPU)
    loader.set_epoch(3)
    full = [x for x, _ in loader]
    for k in (1, 7, 23):
        if workers == 0:  # count the samples read from the shards
            read = []
            orig = wds.iter_shard
            monkeypatch.setattr(wds, "iter_shard", lambda *a, **kw: (read.append(1) or s for s in orig(*a, **kw)))
        loader.set_epoch(3, k)
        rest = [x for x, _ in loader]
        assert len(rest) == len(full) - k
        for u, v in zip(rest, full[k:]):
            assert torch.equal(u, v)  # same images, same crops
        if workers == 0:
            assert len(read) <= (len(full) - k) * 2 + 5, (k, len(read))  # remaining + one buffer
            monkeypatch.undo()
    free(loader)


def test_reader_api_streams_and_random_access_agree(data, monkeypatch):
    """The worker-side API other decode paths build on: the bytes of any batch, streamed or
    by seeks, are the plan's samples, and streaming opens each shard once per stream."""
    _, shards = data
    s = open_shards(str(shards))
    plan = ShardPlan(s.counts, 4, 1, 2, train=True, seed=5, streams=2, shuffle_buffer=6)
    reader, other = wds.ShardReader(s, plan), wds.ShardReader(s, plan)
    opened, orig = [], wds._open
    monkeypatch.setattr(wds, "_open", lambda url: opened.append(url) or orig(url))
    batches = {g: reader.read_batch(2, g) for g in (1, 3, 5)}  # stream 1, in order
    runs = list(plan.runs(2, plan.stream_starts[1], plan.stream_starts[1] + plan.stream_sizes[1]))
    assert opened == [s.urls[k] for k, _, _ in runs] and len(set(opened)) == len(opened)  # once each
    monkeypatch.undo()
    batches.update({g: reader.read_batch(2, g) for g in (0, 2, 4)})  # then stream 0
    for g, got in batches.items():
        sh, mem = plan.batch_positions(2, g)
        assert [r.sid for r in got] == (s.starts[sh] + mem).tolist()
        assert got == other.read_positions(sh, mem)  # by seeks: the same samples
    assert len({r.sid for b in batches.values() for r in b}) == 24
    assert all(r.error is None for b in batches.values() for r in b)
    assert wds.sample_rng(0, 2, 7).random() == np.random.default_rng((0, 2, 7)).random()


def test_pipe_urls_read_the_same(data):
    _, shards = data
    pattern = str(shards / "train-{000000..000006}.tar")
    local = build_loader(loader_cfg(pattern, wds={"shuffle_buffer": 4}), "train", CPU)
    piped = build_loader(loader_cfg(f"pipe:cat {pattern}", wds={"shuffle_buffer": 4}), "train", CPU)
    assert len(piped) == len(local) == N // 4
    for e, k in ((0, 0), (1, 5)):  # from the start and resumed (pipes cannot seek: skip by reading)
        assert epoch_ids(piped, e, k) == epoch_ids(local, e, k)
    index = build_loader(loader_cfg(f"pipe:cat {shards}/train.shards.json"), "train", CPU)
    assert index.dataset_size == N and index.shards.urls[0] == f"pipe:cat {shards}/train-000000.tar"
    assert epoch_ids(index, 2) == epoch_ids(build_loader(loader_cfg(shards), "train", CPU), 2)
    with pytest.raises(DatasetError, match="no shard index .* python -m fastcls.tools.shard_index"):
        open_shards(f"pipe:cat {shards}/nope-{{0..1}}.tar")


def test_path_forms_subsets_and_scanning(data, tmp_path):
    _, shards = data
    assert open_shards(str(shards)).num_samples == N  # folder with an index
    assert open_shards(str(shards / "train.shards.json")).num_samples == N
    sub = open_shards(str(shards / "train-{000001..000002}.tar"))
    assert sub.num_samples == 14 and sub.index  # a subset of the index's shards
    assert open_shards(str(shards / "train-000006.tar")).num_samples == 6
    bare = tmp_path / "bare"
    bare.mkdir()
    for t in shards.glob("*.tar"):
        (bare / t.name).write_bytes(t.read_bytes())
    scanned = open_shards(str(bare))  # no index: headers counted
    assert scanned.index == "" and scanned.num_samples == N and scanned.classes == ["0", "1", "2"]
    assert [list(o) for o in scanned.offsets] == [list(o) for o in open_shards(str(shards)).offsets]
    r = subprocess.run([PY, "-m", "fastcls.data.wds", "index", f"pipe:cat {bare}/train-{{000000..000006}}.tar",
                        str(bare / "train.shards.json")], env=run_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "7 shards, 48 samples, 3 classes" in r.stdout, r.stderr
    assert open_shards(str(bare)).counts.tolist() == [7] * 6 + [6]
    cfg = loader_cfg(shards)
    assert split_size(cfg) == N
    with pytest.raises(DatasetError, match="does not exist"):
        open_shards(str(tmp_path / "none-{000000..000001}.tar"))
    with pytest.raises(DatasetError, match="data.exclude applies to folders and list files"):
        build_loader(loader_cfg(shards, exclude=str(tmp_path / "x.txt")), "train", CPU)
    batched = build_loader(loader_cfg(shards, native_decode="batched"), "train", CPU)
    assert type(batched).__name__ == "BatchedShardLoader"  # shards on the batched path too


def _write_shard(path: Path, samples) -> None:
    import webdataset
    with webdataset.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


@pytest.mark.parametrize("path", PATHS)
def test_bad_members_counted_replaced_and_dropped(tmp_path, path):
    """The broken-file zoo inside a shard: zero-byte, HTML-as-.jpg, truncated JPEG, a GIF as
    .jpg (PIL reads it; screened out as on folders), no .cls, a label out of range; odd but
    good: grayscale, CMYK, PNG named .jpg, 1x1. On every decode path (no non-image reaches
    the batched path's or DALI's decoder)."""
    rng = np.random.default_rng(0)
    odd = tmp_path / "odd"
    write_odd_images([odd] * 4, rng)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(buf, "JPEG")
    good = buf.getvalue()
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(buf := io.BytesIO(), "GIF")
    gif = buf.getvalue()
    samples = [{"__key__": f"g{i}", "cls": b"%d" % (i % 2), "jpg": good} for i in range(8)]
    samples += [{"__key__": p.stem, "cls": b"1", "jpg": p.read_bytes()} for p in sorted(odd.glob("*.jpg"))]
    bad = [{"__key__": "zero", "cls": b"0", "jpg": b""},
           {"__key__": "html", "cls": b"0", "jpg": b"<html><body>not found</body></html>"},
           {"__key__": "trunc", "cls": b"1", "jpg": good[: len(good) // 3]},
           {"__key__": "nocls", "jpg": good},
           {"__key__": "label9", "cls": b"9", "jpg": good},
           {"__key__": "gif", "cls": b"1", "jpg": gif}]
    _write_shard(tmp_path / "s-000000.tar", samples[:6] + bad[:3])
    _write_shard(tmp_path / "s-000001.tar", samples[6:] + bad[3:])
    pattern = str(tmp_path / "s-{000000..000001}.tar")
    wds.write_index(wds.scan_shards(wds._expand(pattern), classes=["0", "1"]),
                    str(tmp_path / "s.shards.json"))  # two classes: label 9 is out of range
    if path == "dali":  # DALI reads by position: local shards with offsets in their index
        wds.write_index(wds.scan_shards(wds._expand(pattern), classes=["0", "1"]),
                        str(tmp_path / "s.shards.json"))
    cfg = path_cfg(path, pattern, pattern, batch_size=18, max_bad_fraction=0.5, hflip=0.0)
    train = build_loader(cfg, "train", CPU)
    (x, y), = list(train)
    assert x.shape[0] == 18 and train.classes == ["0", "1"]  # full batch: replaced
    if path == "workers":  # named by member key; the other paths by position (shard.tar:#k)
        assert sorted(b.split(":")[1] for b in train.bad_files) == ["gif", "html", "label9", "nocls",
                                                                      "trunc", "zero"]
    assert len(train.bad_files) == 6 and any("no .cls member" in b for b in train.bad_files)
    assert any("not an image file" in b for b in train.bad_files)  # the GIF, screened
    val = build_loader(cfg, "val", CPU, classes=["0", "1"])
    assert sum(len(y) for _, y in val) == 12 and len(val.bad_files) == 6  # dropped, counted
    strict = build_loader(path_cfg(path, pattern, pattern, max_bad_fraction=0.0), "val", CPU, classes=["0", "1"])
    with pytest.raises(DatasetError, match=r"(?s)undecodable files.*max_bad_fraction.*s-00000[01].tar:"):
        list(strict)


def test_broken_and_stale_shards_are_one_line_errors(data, tmp_path):
    _, shards = data
    broken = tmp_path / "b"
    broken.mkdir()
    for t in shards.iterdir():
        (broken / t.name).write_bytes(t.read_bytes())
    raw = (broken / "train-000003.tar").read_bytes()
    (broken / "train-000003.tar").write_bytes(raw[: len(raw) // 2 + 100])
    loader = build_loader(loader_cfg(broken, wds={"shuffle_buffer": 0}), "train", CPU)
    with pytest.raises(DatasetError, match=r"shard '.*train-000003.tar' (is unreadable|has \d+ samples, "
                                           r"fewer than its index says)"):
        for e in range(3):
            epoch_ids(loader, e)
    meta = json.loads((broken / "train.shards.json").read_text())
    meta["shards"][0]["count"] += 2
    meta["shards"][0]["offsets"] += [0, 0]
    (broken / "train.shards.json").write_text(json.dumps(meta))
    (broken / "train-000003.tar").write_bytes(raw)
    loader = build_loader(loader_cfg(broken, broken, batch_size=50), "val", CPU,
                          classes=["a", "b", "c"])
    with pytest.raises(DatasetError, match="train-000000.tar' has 7 samples, fewer than its index says"):
        list(loader)


def test_print_config_counts_shards(data):
    _, shards = data
    r = subprocess.run([PY, "-m", "fastcls.train", "pipelines/demo.yaml", f"data.train={shards}",
                        f"data.val={shards}", "data.batch_size=4", "--print-config"],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train_images: 48" in r.stdout and "steps_per_epoch: 12" in r.stdout


# ---------------------------------------------------------------- torchrun, demo

def test_torchrun_two_ranks_disjoint_and_val_once(data, tmp_path):
    _, shards = data
    out = tmp_path / "seen.json"
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "helpers" / "wds_shard_check.py"), str(shards),
                           str(out)], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    a, b = r["ranks"]
    assert a["len"] == b["len"] == 6 and a["val_len"] == b["val_len"] == 6
    for epoch in ("train0", "train1"):
        assert len(a[epoch]) == len(b[epoch]) == 24 and not set(a[epoch]) & set(b[epoch])
        assert sorted(a[epoch] + b[epoch]) == list(range(N))
    assert a["train0"] != a["train1"]
    assert sorted(a["val"] + b["val"]) == list(range(N))  # each val image scored once
    assert a["resumed"] == a["train1"][4 * 2:]  # set_epoch(1, 2) continues exactly


def test_demo_trains_from_shards_to_bar(demo_cache, tmp_path):
    demo = demo_cache / "demo-v1"
    for split in ("train", "val"):
        r = subprocess.run([PY, "-m", "fastcls.tools.convert", "--to", "wds", str(demo / split),
                            str(tmp_path / split), "--shard-size", "200KB", "--no-progress"],
                           env=run_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "fastcls.train", "pipelines/demo.yaml", f"train.out_dir={out}",
                           f"data.train={tmp_path}/train/train.shards.json",  # the index
                           f"data.val={tmp_path}/val"],                       # a folder of shards
                          cwd=ROOT, env=run_env(demo_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["val_images"] == 200
    assert rows[-1]["val_top1"] > 80.0, rows[-1]  # the demo's bar (test_train.py)


@pytest.mark.gpu
def test_shards_cuda_contract(data):
    _, shards = data
    dev = torch.device("cuda")
    cfg = loader_cfg(shards, shards, workers=2)
    loader = build_loader(cfg, "train", dev, dtype=torch.bfloat16)  # auto: the PIL workers
    check_contract(loader, dtype=torch.bfloat16, device=dev, tol=0.02)
    val = build_loader(cfg, "val", dev, classes=loader.classes)
    assert sum(y.shape[0] for _, y in val) == N
    free(loader, val)
