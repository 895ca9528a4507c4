"""Tar shards (fastcls/data/shards.py, `convert --to wds`): the layout read back by webdataset's
own reader, the epoch plan's sharding, resume without replay, the ShardSource's streamed and
positional reads, pipe: URLs, path forms and the index tool, members without a usable
label, broken shards, torchrun over gloo. Per decode path (contract, order, seek, zoo, demo):
the matrix in test_data.py."""
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcls.data import DatasetError, _spec, build_loader, split_size
from fastcls.data import shards as shards_mod
from fastcls.data.shards import ShardPlan, ShardSource, expand_urls, iter_shard, open_shards, scan_shards
from fastcls.tools.convert import convert_wds, parse_size
from fastcls.tools.shard_index import write_index

from conftest import CPU, PY, ROOT, ids, index_folder, loader_cfg, run_env, write_odd_images

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
N = 48  # index_folder's images: 2 ranks x batch 4 x 6 steps, nothing dropped


def epoch_ids(loader, epoch, start=0) -> list[int]:
    loader.set_epoch(epoch, start)
    return [i for x, _ in loader for i in ids(x)]


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
    mine = [s.name.split(":")[1] for u in urls for s in iter_shard(u)]
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


# ---------------------------------------------------------------- reading

def test_resume_does_not_replay(data, monkeypatch):
    """A seek to batch k reads the remaining batches' samples plus at most one shuffle buffer
    (that the resumed batches equal the uninterrupted ones is the matrix's seek test)."""
    _, shards = data
    cfg = loader_cfg(shards, workers=0, batch_size=2, wds={"shuffle_buffer": 5})
    loader = build_loader(cfg, "train", CPU)
    loader.set_epoch(3)
    full = len(list(loader))
    for k in (1, 7, 23):
        read = []  # the samples read from the shards
        orig = shards_mod.iter_shard
        monkeypatch.setattr(shards_mod, "iter_shard",
                            lambda *a, **kw: (read.append(1) or s for s in orig(*a, **kw)))
        loader.set_epoch(3, k)
        assert len(list(loader)) == full - k
        assert len(read) <= (full - k) * 2 + 5, (k, len(read))  # remaining + one buffer
        monkeypatch.undo()


def test_source_streams_and_reads_by_position_agree(data, monkeypatch):
    """The ShardSource every decode path reads: any batch streamed (`read_batch`) holds the
    plan's samples, the same as read one by one by position (`read`), and streaming opens
    each shard once per stream."""
    _, shards = data
    cfg = loader_cfg(shards, workers=2, wds={"shuffle_buffer": 6})
    spec = _spec(cfg, "train", str(shards), CPU, 4, rank=1, world_size=2)
    source, other = ShardSource(open_shards(str(shards)), spec), ShardSource(open_shards(str(shards)), spec)
    plan = source.order
    assert source.random_access and plan.streams == 2 and len(plan) == 6
    opened, orig = [], shards_mod._open
    monkeypatch.setattr(shards_mod, "_open", lambda url: opened.append(url) or orig(url))
    batches = {g: source.read_batch(2, g) for g in (1, 3, 5)}  # stream 1, in order
    runs = list(plan.runs(2, plan.stream_starts[1], plan.stream_starts[1] + plan.stream_sizes[1]))
    urls = source.shards.urls
    assert opened == [urls[k] for k, _, _ in runs] and len(set(opened)) == len(opened)  # once each
    monkeypatch.undo()
    batches.update({g: source.read_batch(2, g) for g in (0, 2, 4)})  # then stream 0
    for g, got in batches.items():
        assert [r.sid for r in got] == plan.batch(2, g).tolist()
        assert got == [other.read(sid) for sid in plan.batch(2, g)]  # by seeks: the same samples
    assert len({r.sid for b in batches.values() for r in b}) == 24
    assert all(r.error is None and r.name.startswith("train-0000") for b in batches.values() for r in b)
    with pytest.raises(IndexError):
        source.read_batch(2, 6)


def test_pipe_urls_read_the_same(data):
    _, shards = data
    pattern = str(shards / "train-{000000..000006}.tar")
    local = build_loader(loader_cfg(pattern, wds={"shuffle_buffer": 4}), "train", CPU)
    piped = build_loader(loader_cfg(f"pipe:cat {pattern}", wds={"shuffle_buffer": 4}), "train", CPU)
    assert len(piped) == len(local) == N // 4
    for e, k in ((0, 0), (1, 5)):  # from the start and resumed (pipes cannot seek: skip by reading)
        assert epoch_ids(piped, e, k) == epoch_ids(local, e, k)
    index = build_loader(loader_cfg(f"pipe:cat {shards}/train.shards.json"), "train", CPU)
    assert index.dataset_size == N and index.source.shards.urls[0] == f"pipe:cat {shards}/train-000000.tar"
    assert not index.source.random_access and local.source.random_access
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
    for cmd in (["fastcls.tools.shard_index"], ["fastcls.data.wds", "index"]):  # the old spelling too
        (bare / "train.shards.json").unlink(missing_ok=True)
        r = subprocess.run([PY, "-m", *cmd, f"pipe:cat {bare}/train-{{000000..000006}}.tar",
                            str(bare / "train.shards.json")], env=run_env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "7 shards, 48 samples, 3 classes" in r.stdout, (cmd, r.stderr)
        assert open_shards(str(bare)).counts.tolist() == [7] * 6 + [6]
    cfg = loader_cfg(shards)
    assert split_size(cfg) == N
    with pytest.raises(DatasetError, match="does not exist"):
        open_shards(str(tmp_path / "none-{000000..000001}.tar"))
    with pytest.raises(DatasetError, match="data.exclude applies to folders and list files"):
        build_loader(loader_cfg(shards, exclude=str(tmp_path / "x.txt")), "train", CPU)
    batched = build_loader(loader_cfg(shards, native_decode="batched"), "train", CPU)
    assert type(batched).__name__ == "BatchedLoader" and isinstance(batched.source, ShardSource)


def _write_shard(path: Path, samples) -> None:
    import webdataset
    with webdataset.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def test_members_without_a_usable_label_are_counted_bad_samples(tmp_path):
    """A sample with no .cls member or a label outside the index's classes is a bad sample,
    named `shard.tar:key`: replaced (counted) in training, dropped (counted) in validation."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(buf, "JPEG")
    good = buf.getvalue()
    samples = [{"__key__": f"g{i}", "cls": b"%d" % (i % 2), "jpg": good} for i in range(8)]
    _write_shard(tmp_path / "s-000000.tar", samples[:4] + [{"__key__": "nocls", "jpg": good}])
    _write_shard(tmp_path / "s-000001.tar", samples[4:] + [{"__key__": "label9", "cls": b"9", "jpg": good}])
    pattern = str(tmp_path / "s-{000000..000001}.tar")
    write_index(scan_shards(expand_urls(pattern), classes=["0", "1"]),
                str(tmp_path / "s.shards.json"))  # two classes: label 9 is out of range
    cfg = loader_cfg(pattern, pattern, native_decode="workers", batch_size=10, max_bad_fraction=0.5)
    train = build_loader(cfg, "train", CPU)
    (x, y), = list(train)
    assert x.shape[0] == 10 and train.classes == ["0", "1"] and set(y.tolist()) <= {0, 1}  # replaced
    assert {b.split(": ")[0] for b in train.bad_files} == {"s-000000.tar:nocls", "s-000001.tar:label9"}
    assert "s-000000.tar:nocls: no .cls member" in train.bad_files
    assert any(b.startswith("s-000001.tar:label9: .cls b'9' is not a class index in 0..1")
               for b in train.bad_files), train.bad_files
    val = build_loader(cfg, "val", CPU, classes=["0", "1"])
    assert sum(len(y) for _, y in val) == 8 and len(val.bad_files) == 2  # dropped, counted


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


# ---------------------------------------------------------------- torchrun

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
