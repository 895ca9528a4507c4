"""The data test matrix: every Source x every decode path (docs/design.md).

Sources (SOURCE_FORMS): an ImageFolder, a PaddleClas list file, tar shards from a path, the
same shards through `pipe:`, Parquet files written by Hugging Face `datasets` (Image +
ClassLabel features, several files of small row groups). Paths (PATHS): PIL in DataLoader workers, the batched path with
each batch decoder, DALI's CPU graph (random-access sources only: a `pipe:` stream is
refused with a message). A new source or path is covered by adding it to these lists.

Per cell: the loader contract, labels, this rank's order = the Source's order (disjoint
equal ranks), each validation image once on 2 ranks, a mid-epoch seek bitwise equal to the
uninterrupted epoch (in a fresh loader, as a resumed process), every crop box and flip
equal to `sample.train_crop` for its sample (so equal across paths; `train_crop` itself is
held to torchvision's RandomResizedCrop in test_sample.py), progressive and validation
sizes, the broken-file zoo counted / replaced / dropped, and (gpu) the CUDA contract.
FFCV and synthetic, which read no Source, have their own files (test_ffcv.py, test_sample.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcls.data import DatasetError, build_loader, scan_folder
from fastcls.data.sample import sample_rng, train_crop

from conftest import (
    CPU,
    PY,
    ROOT,
    ZOO_BAD,
    ZOO_GOOD,
    assert_verdict_stable,
    check_contract,
    ids,
    index_folder,
    loader_cfg,
    photo_folder,
    run_env,
    unnormalize,
    zoo_folder,
    zoo_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _closed():
    """Every loader a test builds is closed when it ends, passed or failed: a DALI pipeline
    left running (its threads) in this process makes the next fork of DataLoader workers
    crash (a forked child inherits locks held by threads that do not exist in it)."""
    from fastcls.data import closing_loaders
    with closing_loaders():
        yield

_HAVE = {m: importlib.util.find_spec(m.split(".")[0]) is not None and importlib.util.find_spec(m) is not None
         for m in ("nvidia.dali", "nvidia.nvimgcodec", "datasets")}
NEED_DATASETS = pytest.mark.skipif(not _HAVE["datasets"], reason="the Parquet fixtures are written by Hugging "
                                   "Face datasets: pip install 'fastcls[test]' (or pip install datasets)")
SOURCE_FORMS = ["folder", "list", "shards", "pipe", "parquet"]
SOURCE_MARKS = {"parquet": [NEED_DATASETS]}
PATHS = ["workers", "batched:torchvision",
         pytest.param("batched:nvimgcodec", marks=pytest.mark.skipif(not _HAVE["nvidia.nvimgcodec"],
                                                                   reason="pip install 'fastcls[nvimgcodec]'")),
         pytest.param("dali", marks=pytest.mark.skipif(not _HAVE["nvidia.dali"], reason="pip install 'fastcls[dali]'"))]
STREAMS = {"pipe"}  # sources without random access: DALI refuses them (test_dali_refuses_a_stream)
CELLS = [pytest.param(s, getattr(p, "values", [p])[0], marks=[*getattr(p, "marks", ()), *SOURCE_MARKS.get(s, ())],
                      id=f"{s}-{getattr(p, 'values', [p])[0]}")
         for s in SOURCE_FORMS for p in PATHS if not (s in STREAMS and getattr(p, "values", [p])[0] == "dali")]


CLASS_FILES: dict[str, str] = {}  # list file -> its class file (data.classes_file), from forms()


def path_cfg(path: str, train, val="", **data):
    """loader_cfg (batches of 4, 32 px) on decode path `path` ("workers", "batched:DECODER",
    "dali"); a list file from forms() comes with its class file."""
    if str(train) in CLASS_FILES:
        data.setdefault("classes_file", CLASS_FILES[str(train)])
    if path == "dali":
        return loader_cfg(train, val, backend="dali", **data)
    decode, *decoder = path.split(":")
    return loader_cfg(train, val, native_decode=decode, **({"decoder": decoder[0]} if decoder else {}), **data)


def write_parquet(rows: list[tuple[bytes | None, str, int]], classes: list[str], out: Path, prefix: str, *,
                  files: int = 3, per_group: int = 5) -> list[Path]:
    """(image bytes, file name, label) rows as Hugging Face writes a dataset: `datasets`'
    Image() and ClassLabel features, `Dataset.to_parquet` into `files` files
    <prefix>-NNNNN-of-NNNNN.parquet of `per_group` rows per row group. -> the files."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage
    images = [None if b is None else {"bytes": b, "path": n} for b, n, _ in rows]
    ds = Dataset.from_dict({"image": images, "label": [lab for _, _, lab in rows]},
                           features=Features({"image": HFImage(), "label": ClassLabel(names=classes)}))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}-{i:05d}-of-{files:05d}.parquet" for i in range(files)]
    for i, p in enumerate(paths):
        ds.shard(num_shards=files, index=i, contiguous=True).to_parquet(str(p), batch_size=per_group)
    return paths


def forms(folder: Path, tmp: Path, per_shard: int = 7) -> tuple[dict, dict]:
    """The folder as each source form -> ({form: data.train value}, {form: sample id ->
    index of the image in the folder's scan order})."""
    from fastcls.data.shards import iter_shard, open_shards
    from fastcls.tools.convert import convert_wds
    idx = scan_folder(str(folder))
    tmp.mkdir(parents=True, exist_ok=True)
    lst = tmp / f"{folder.name}_list.txt"
    lst.write_text("".join(f"{os.path.relpath(p, tmp)} {label}\n" for p, label in idx.samples))
    (tmp / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(idx.classes)))
    CLASS_FILES[str(lst)] = str(tmp / "classes.txt")
    convert_wds(str(folder), str(tmp / "shards"), per_shard=per_shard, workers=1, progress=False)
    shards = open_shards(str(tmp / "shards"))
    pos = {str(Path(p).relative_to(folder).with_suffix("")): i for i, (p, _) in enumerate(idx.samples)}
    keys = [s.name.split(":", 1)[1] for u in shards.urls for s in iter_shard(u, data=False)]
    sid2id = np.array([pos[k] for k in keys])
    n = len(shards.urls)
    pattern = str(tmp / "shards" / f"{folder.name}-{{000000..{n - 1:06d}}}.tar")
    paths = {"folder": str(folder), "list": str(lst), "shards": str(tmp / "shards"), "pipe": f"pipe:cat {pattern}"}
    ids = {k: (np.arange(len(idx.samples)) if k in ("folder", "list") else sid2id) for k in paths}
    if _HAVE["datasets"]:  # the rows shuffled once, as the Hub's files are
        perm = np.random.default_rng(1).permutation(len(idx.samples))
        rows = [(Path(idx.samples[i][0]).read_bytes(), os.path.relpath(idx.samples[i][0], folder),
                 idx.samples[i][1]) for i in perm]
        write_parquet(rows, idx.classes, tmp / "parquet", folder.name, per_group=max(2, per_shard - 2))
        paths["parquet"], ids["parquet"] = str(tmp / "parquet"), perm
    return paths, ids


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ids")
    return forms(index_folder(tmp / "idx"), tmp)


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("photos")
    return forms(photo_folder(tmp / "photos", per_class=4), tmp, per_shard=5)


W, H = 240, 180  # the coordinate images: red = source x, green = source y, blue = 30 * file


@pytest.fixture(scope="module")
def ramp_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ramps")
    yy, xx = np.mgrid[0:H, 0:W]
    (tmp / "ramps" / "a").mkdir(parents=True)
    for k in range(8):
        Image.fromarray(np.stack([xx, yy, np.full_like(xx, 30 * k)], -1).astype(np.uint8)).save(
            tmp / "ramps" / "a" / f"{k}.png")
    return forms(tmp / "ramps", tmp, per_shard=3)


def close(*loaders):
    for loader in loaders:
        loader.close()


# ---------------------------------------------------------------- contract, labels, order

@pytest.mark.parametrize("source, path", CELLS)
def test_contract_labels_rank_order_and_val_once(id_data, source, path):
    paths, sid2id = id_data
    p, to_id = paths[source], sid2id[source]
    cfg = path_cfg(path, p, p, workers=2, wds={"shuffle_buffer": 10})
    train = [build_loader(cfg, "train", CPU, rank=r, world_size=2) for r in range(2)]
    assert [len(t) for t in train] == [6, 6] and train[0].dataset_size == 48
    assert train[0].classes == ["a", "b", "c"]
    check_contract(train[0])
    seen = {}
    for epoch in (1, 2):
        per_rank = []
        for r, loader in enumerate(train):
            loader.set_epoch(epoch)
            got, labels = [], []
            for x, y in loader:
                got += ids(x)
                labels += y.tolist()
            assert labels == [i // 16 for i in got]                       # labels follow classes
            assert got == to_id[loader.order.ids(epoch)].tolist()          # the Source's order
            per_rank.append(got)
        assert not set(per_rank[0]) & set(per_rank[1])                    # disjoint ranks
        assert sorted(per_rank[0] + per_rank[1]) == list(range(48))       # the whole set
        seen[epoch] = per_rank
    assert seen[1] != seen[2]                                             # reshuffled
    close(*train)
    got = []
    for r in range(2):
        val = build_loader(cfg, "val", CPU, rank=r, world_size=2, classes=["a", "b", "c"])
        batches = check_contract(val, list(val), batch=4) if r == 0 else list(val)
        for x, y in batches:
            assert y.tolist() == [i // 16 for i in ids(x)]
            got += ids(x)
        close(val)
    assert sorted(got) == list(range(48)) and len(got) == 48              # each val image once


# ---------------------------------------------------------------- seek, crops, sizes

@pytest.mark.parametrize("source, path", CELLS)
def test_mid_epoch_seek_repeats_the_epoch_bitwise(photo_data, source, path):
    """Real photographs; a fresh loader (a resumed process) seeking to batch 3 yields the
    uninterrupted epoch's batches bit for bit: same samples, crops and flips."""
    p = photo_data[0][source]
    cfg = path_cfg(path, p, workers=2, wds={"shuffle_buffer": 6})
    loader = build_loader(cfg, "train", CPU)
    loader.set_epoch(1)
    full = [x for x, _ in loader]
    assert len(full) == len(loader) == 6
    fresh = build_loader(cfg, "train", CPU)
    fresh.set_epoch(1, start_step=3)
    tail = [x for x, _ in fresh]
    assert len(tail) == 3 and all(torch.equal(a, b) for a, b in zip(full[3:], tail))
    assert len(list(fresh)) == 6  # the seek applied to one iteration only
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], full[0])
    close(loader, fresh)


@pytest.mark.parametrize("source, path", CELLS)
def test_every_crop_and_flip_is_train_crops(ramp_data, source, path):
    """Each output is read back (coordinate-coded images: red = x, green = y) into its source
    window and flip, and must be the box and flip `train_crop` draws for that sample from
    sample_rng(seed, epoch, sample id): one draw, the same on every path."""
    paths, sid2id = ramp_data
    S = 48
    cfg = path_cfg(path, paths[source], image_size=S, val_resize=S, batch_size=8, hflip=0.5, workers=2)
    loader = build_loader(cfg, "train", CPU)
    flips = []
    for epoch in (4, 5):
        loader.set_epoch(epoch)
        (x, _), = list(loader)
        pix = unnormalize(x).numpy().astype(np.float64)
        i = np.arange(S) + 0.5
        mid = slice(S // 4, 3 * S // 4)  # away from the borders, where filters clamp
        for row, sid in enumerate(loader.order.batch(epoch, 0).tolist()):
            assert abs(pix[row, 2].mean() - 30 * sid2id[source][sid]) < 2  # blue: the file
            c = train_crop(W, H, sample_rng(0, epoch, sid), (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
            sx, x0 = np.polyfit(i[mid], pix[row, 0].mean(0)[mid], 1)
            sy, y0 = np.polyfit(i[mid], pix[row, 1].mean(1)[mid], 1)
            assert (sx < 0) == c.flip
            # the fitted ramp slope is within 1 px + 2% of the box: antialiased downscaling
            # (PIL's and DALI's filters) bends the ramp near the window's edges
            tol_w, tol_h = 1 + 0.02 * c.width, 1 + 0.02 * c.height
            assert abs(abs(sx) * S - c.width) < tol_w and abs(sy * S - c.height) < tol_h, (sid, c, sx * S, sy * S)
            assert abs(y0 - c.top) < 1.5 and abs((x0 + sx * S if c.flip else x0) - c.left) < 1.5
            flips.append(c.flip)
    assert 0 < sum(flips) < len(flips)  # both kinds were checked
    close(loader)


@pytest.mark.parametrize("source, path", CELLS)
def test_progressive_and_validation_sizes(id_data, source, path):
    """data.progressive per epoch inside persistent workers / DALI's one pipeline (an
    input), kept by a mid-epoch seek; validation at data.val_image_size."""
    p = id_data[0][source]
    ramp = {"image_size": 32, "progressive": {"start_size": 16, "start_epoch": 0, "end_epoch": 3, "multiple": 8}}
    cfg = path_cfg(path, p, p, val_image_size=40, val_resize=44, workers=2, **ramp)
    train = build_loader(cfg, "train", CPU)
    for epoch, size in enumerate([16, 24, 24, 32]):
        train.set_epoch(epoch)
        batches = list(train)
        assert {tuple(x.shape) for x, _ in batches} == {(4, 3, size, size)}
        train.set_epoch(epoch, start_step=2)
        tail = list(train)
        assert len(tail) == len(batches) - 2 and torch.equal(tail[0][0], batches[2][0])
    val = build_loader(cfg, "val", CPU, classes=train.classes)
    assert {tuple(x.shape[1:]) for x, _ in val} == {(3, 40, 40)}
    if path == "dali":  # every size from the one pipeline (a seek builds one at that step)
        assert train.builds == 1 + 4 and val.builds == 1
    close(train, val)


# ---------------------------------------------------------------- the broken-file zoo

SHARD_ONLY_BAD = ["label9", "nocls"]  # tar members without a usable class
PARQUET_ONLY_BAD = ["nolabel", "null"]  # rows: the Hub's label -1 (unlabelled), no image at all
ZOO_NAMES: dict[str, str] = {}  # "file.parquet:#row" -> the zoo file's stem, from zoo_data


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory):
    """The zoo (conftest.zoo_folder) as every source form; the shards hold it member for
    member (written with webdataset's TarWriter: the converter would drop the bad files),
    plus a member without .cls and one with a label out of range."""
    import webdataset

    from fastcls.data.shards import expand_urls, iter_shard, scan_shards
    from fastcls.tools.shard_index import write_index
    tmp = tmp_path_factory.mktemp("zoo")
    root = zoo_folder(tmp / "zoo")
    files = sorted((root / "a").iterdir())
    (tmp / "zoo_list.txt").write_text("".join(f"zoo/a/{f.name} 0\n" for f in files))
    (tmp / "s").mkdir()
    members = [{"__key__": f.stem, "cls": b"0", f.suffix[1:]: f.read_bytes()} for f in files]
    good = (root / "a" / "plain.jpg").read_bytes()
    members += [{"__key__": "nocls", "jpg": good}, {"__key__": "label9", "cls": b"9", "jpg": good}]
    for k, part in enumerate((members[:8], members[8:])):
        with webdataset.TarWriter(str(tmp / "s" / f"zoo-{k:06d}.tar"), encoder=False) as w:
            for m in part:
                w.write(m)
    pattern = str(tmp / "s" / "zoo-{000000..000001}.tar")
    write_index(scan_shards(expand_urls(pattern), classes=["a"]), str(tmp / "s" / "zoo.shards.json"))
    paths = {"folder": str(root), "list": str(tmp / "zoo_list.txt"), "shards": str(tmp / "s"),
             "pipe": f"pipe:cat {pattern}"}
    keys = [s.name.split(":", 1)[1] for u in expand_urls(pattern) for s in iter_shard(u, data=False)]
    names = {"folder": [f.stem for f in files], "list": [f.stem for f in files], "shards": keys, "pipe": keys}
    if _HAVE["datasets"]:
        rows = [(f.read_bytes(), f.name, 0) for f in files]
        rows += [((root / "a" / "plain.jpg").read_bytes(), "nolabel.jpg", -1), (None, "null.jpg", 0)]
        rows = [rows[i] for i in np.random.default_rng(2).permutation(len(rows))]
        written = write_parquet(rows, ["a"], tmp / "pq", "zoo", files=2, per_group=3)
        paths["parquet"], names["parquet"] = str(tmp / "pq" / "zoo-*.parquet"), [Path(n).stem for _, n, _ in rows]
        import pyarrow.parquet as pq
        sid = 0
        for p in written:
            for r in range(pq.ParquetFile(p).metadata.num_rows):
                ZOO_NAMES[f"{p.name}:#{r}"] = names["parquet"][sid]
                sid += 1
    return paths, names, zoo_reference(root, 32, 36)


def stems(bad_files) -> list[str]:
    """The file stems / member keys in "name: reason" strings (path/x.jpg or shard.tar:key)."""
    names = [b.split(": ", 1)[0] for b in bad_files]
    return sorted(ZOO_NAMES[n] if n in ZOO_NAMES else n.rsplit(":", 1)[1] if ".tar:" in n else Path(n).stem
                  for n in names)


@pytest.mark.parametrize("source, path", CELLS)
def test_broken_file_zoo_counted_replaced_and_dropped(zoo_data, source, path):
    """HTML/text/zero-byte/truncated/GIF files never reach a decoder (an HTML page crashed
    DALI's C++ decoder) and are counted; CMYK, grayscale, progressive, 1x1, 16-bit PNGs,
    RGBA and PNG-as-.jpg decode to the PIL path's pixels. Validation drops and names each
    bad one; training fills every batch with replacements (a `pipe:` stream: from the batch)."""
    paths, names, ref = zoo_data
    bad = sorted(Path(n).stem for n in ZOO_BAD) + (SHARD_ONLY_BAD if source in ("shards", "pipe") else []) \
        + (PARQUET_ONLY_BAD if source == "parquet" else [])
    cfg = path_cfg(path, paths[source], paths[source], max_bad_fraction=1.0, workers=2, hflip=0.0)
    val = build_loader(cfg, "val", CPU, classes=["a"])
    x = torch.cat([b for b, _ in val])
    assert stems(val.bad_files) == sorted(bad)
    assert x.shape == (len(ZOO_GOOD), 3, 32, 32)  # every decodable file, once
    got = unnormalize(x).permute(0, 2, 3, 1).numpy()
    good = {Path(n).stem: n for n in ZOO_GOOD}  # in the order of the Source's plan:
    order = [good[k] for k in (names[source][sid] for sid in val.order.ids(0)) if k in good]
    for i, n in enumerate(order):
        diff = np.abs(got[i] - ref[n].astype(np.float32)).mean()
        assert diff < 6.0, (n, diff)  # other resize filters, same image
    train = build_loader(cfg, "train", CPU)
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = [b for b, _ in train]
        assert len(batches) == len(train) and all(b.shape == (4, 3, 32, 32) for b in batches)
        assert train.bad_files and set(stems(train.bad_files)) <= set(bad)
    strict = build_loader(path_cfg(path, paths[source], paths[source], max_bad_fraction=0.0), "val", CPU,
                          classes=["a"])
    # the first bad samples named (Parquet rows by position, file:#row) with their reasons
    with pytest.raises(DatasetError, match=r"(?s)undecodable files.*max_bad_fraction.*"
                                           r"(gif|html|text|trunc|zero|not an image file|empty file)"):
        list(strict)
    close(val, train, strict)


# ---------------------------------------------------------------- what a path refuses

def test_dali_refuses_a_stream(id_data):
    pytest.importorskip("nvidia.dali")
    with pytest.raises(DatasetError, match=r"data.backend=dali reads samples by position.*data.backend=native"):
        build_loader(path_cfg("dali", id_data[0]["pipe"]), "train", CPU)


@pytest.mark.parametrize("path", ["dali", "batched:nvimgcodec"])
def test_missing_install_says_how_to_install(id_data, monkeypatch, path):
    monkeypatch.setitem(sys.modules, "nvidia.dali" if path == "dali" else "nvidia.nvimgcodec", None)
    message = (r"nvidia.dali is not installed; run: pip install 'fastcls\[dali\]'.*nvidia-dali-cuda130"
               if path == "dali" else r"nvImageCodec is not installed; run: pip install 'fastcls\[nvimgcodec\]'")
    with pytest.raises(DatasetError, match=message):
        build_loader(path_cfg(path, id_data[0]["folder"]), "train", CPU)


# ---------------------------------------------------------------- Parquet specifics

def _source(path, train=True, classes=None, **data):
    from fastcls.data import _spec, open_source
    cfg = loader_cfg(path, path, **data)
    return open_source(_spec(cfg, "train" if train else "val", str(path), CPU, batch_size=4, classes=classes))


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    """16 real photographs as Hugging Face writes them: classes named out of sorted order,
    4 Parquet files of row groups of 3, and the same dataset saved with save_to_disk."""
    tmp = tmp_path_factory.mktemp("hf")
    idx = scan_folder(str(photo_folder(tmp / "photos", per_class=3)))
    names = ["zebra", "ant", "mole", "yak", "bee", "cat"]  # ClassLabel order, not sorted
    rows = [(Path(p).read_bytes(), Path(p).name, label) for p, label in idx.samples[:16]]
    files = write_parquet(rows, names, tmp / "data", "train", files=4, per_group=3)
    from datasets import Dataset
    Dataset.from_parquet([str(f) for f in files]).save_to_disk(str(tmp / "saved"), num_shards=2)
    return tmp, rows, names, files


@NEED_DATASETS
def test_parquet_file_folder_glob_brace_and_save_to_disk(hf_data):
    """Every way to name the files reads the same rows in the same order, with the
    ClassLabel names (not sorted) as the classes and the row groups as written."""
    tmp, rows, names, files = hf_data
    forms = [str(tmp / "data"), str(tmp / "data" / "train-*.parquet"),
             str(tmp / "data" / "train-{00000..00003}-of-00004.parquet"), str(tmp / "saved")]
    for form in forms:
        src = _source(form)
        assert src.classes == names and src.random_access and src.num_samples == 16, form
        got = [src.read(i) for i in range(16)]
        assert [r.data for r in got] == [b for b, _, _ in rows], form
        assert [r.label for r in got] == [lab for _, _, lab in rows] and all(r.error is None for r in got)
        assert src.empty_classes == [n for i, n in enumerate(names) if i not in {lab for _, _, lab in rows}]
    one = _source(str(files[1]))
    assert one.num_samples == 4 and one.read(0).data == rows[4][0] and one.name(1) == f"{files[1].name}:#1"
    assert len(_source(str(tmp / "data")).group_start) - 1 == 8  # 4 files x 2 row groups (3 + 1)


@NEED_DATASETS
def test_parquet_classes_and_validation_must_agree(hf_data, tmp_path):
    """Validation takes training's classes: equal ClassLabel names, or an error."""
    tmp, rows, names, files = hf_data
    assert _source(str(files[0]), train=False, classes=names).classes == names
    with pytest.raises(DatasetError, match=r"ClassLabel names of .* differ from training's"):
        _source(str(files[0]), train=False, classes=sorted(names))
    other = write_parquet(rows[:4], sorted(names), tmp_path / "o", "mixed", files=1)
    import shutil
    shutil.copy(files[0], tmp_path / "o")
    with pytest.raises(DatasetError, match=r"names other classes \(ClassLabel\) than"):
        _source(str(tmp_path / "o" / "*.parquet"))
    assert other


@NEED_DATASETS
def test_parquet_pyarrow_binary_column_with_string_labels(tmp_path):
    """A file written by pyarrow alone (no Hugging Face metadata): binary images, string
    labels -> the sorted distinct strings; validation's strings map to training's indices;
    a string training never saw is an error; a non-image blob is a counted bad sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    idx = scan_folder(str(photo_folder(tmp_path / "p", per_class=2)))
    blobs = [Path(p).read_bytes() for p, _ in idx.samples]
    kinds = ["dog", "cat", "emu"] * 4
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary()), "cls": kinds}), tmp_path / "train.parquet",
                   row_group_size=5)
    pq.write_table(pa.table({"jpg": pa.array([blobs[0], b"<html>404</html>", blobs[2]], pa.binary()),
                             "cls": ["emu", "dog", "emu"]}), tmp_path / "val.parquet")
    cfg = loader_cfg(tmp_path / "train.parquet", tmp_path / "val.parquet", max_bad_fraction=1.0)
    train = build_loader(cfg, "train", CPU)
    assert train.classes == ["cat", "dog", "emu"] and train.dataset_size == 12
    check_contract(train)
    val = build_loader(cfg, "val", CPU, classes=train.classes)
    labels = torch.cat([y for _, y in val]).tolist()
    assert labels == [2, 2] and len(val.bad_files) == 1
    assert val.bad_files[0].startswith("val.parquet:#1: not an image file")
    pq.write_table(pa.table({"jpg": pa.array([blobs[0]], pa.binary()), "cls": ["owl"]}), tmp_path / "v2.parquet")
    with pytest.raises(DatasetError, match=r"labels \['owl'\] are not among training's 3 classes"):
        build_loader(cfg, "val", CPU, classes=train.classes, path=str(tmp_path / "v2.parquet"))
    close(train, val)


@NEED_DATASETS
def test_parquet_columns_autodetected_or_named_or_one_line_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    idx = scan_folder(str(index_folder(tmp_path / "i", per_class=(2, 2, 2))))
    blobs = [Path(p).read_bytes() for p, _ in idx.samples]
    pq.write_table(pa.table({"pixels": pa.array(blobs, pa.binary()), "y": [0, 1, 2, 0, 1, 2],
                             "note": ["x"] * 6}), tmp_path / "d.parquet")
    with pytest.raises(DatasetError) as e:
        _source(tmp_path / "d.parquet")
    msg = str(e.value)
    assert "\n" not in msg and "no image column found" in msg and "data.parquet.image_column=NAME" in msg
    assert "columns: pixels (binary), y (int64), note (string)" in msg
    with pytest.raises(DatasetError, match=r"no label column found .*data.parquet.label_column=NAME"):
        _source(tmp_path / "d.parquet", parquet={"image_column": "pixels"})
    with pytest.raises(DatasetError, match=r"label_column='nope' is not a column"):
        _source(tmp_path / "d.parquet", parquet={"image_column": "pixels", "label_column": "nope"})
    with pytest.raises(DatasetError, match=r"image column 'note' .* is string; expected encoded images"):
        _source(tmp_path / "d.parquet", parquet={"image_column": "note", "label_column": "y"})
    src = _source(tmp_path / "d.parquet", parquet={"image_column": "pixels", "label_column": "y"})
    assert src.classes == ["0", "1", "2"] and src.read(4).data == blobs[4] and src.read(4).label == 1


@NEED_DATASETS
def test_parquet_folder_of_several_splits_and_dataset_dict_say_what_to_name(tmp_path):
    from datasets import Dataset, DatasetDict
    idx = scan_folder(str(index_folder(tmp_path / "i", per_class=(2, 2, 2))))
    rows = [(Path(p).read_bytes(), Path(p).name, lab) for p, lab in idx.samples]
    write_parquet(rows, ["a", "b", "c"], tmp_path / "hub", "train", files=2)
    write_parquet(rows, ["a", "b", "c"], tmp_path / "hub", "validation", files=1)
    with pytest.raises(DatasetError, match=r"several splits \(train, validation\); name one, e\.g\. "
                                           r"data.train=.*hub/train-\*\.parquet"):
        _source(tmp_path / "hub")
    assert _source(tmp_path / "hub" / "validation-*.parquet").num_samples == 6
    ds = Dataset.from_parquet(str(tmp_path / "hub" / "train-*.parquet"))
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"DatasetDict .* name a split: data.train=.*dd/test, data.train=.*dd/train"):
        _source(tmp_path / "dd")
    assert _source(tmp_path / "dd" / "train").classes == ["a", "b", "c"]


@NEED_DATASETS
def test_parquet_source_pickles_without_data_and_reads_each_row_group_once(hf_data, monkeypatch):
    """What a worker receives: counts and labels (numpy), no open file, no cached row group.
    Training follows the shards' plan over row groups: each worker's stream decodes each of
    its row groups once per epoch (a random order would re-read one per sample) and keeps
    at most `_keep` of them; the streams together give the epoch's ids exactly."""
    import pickle

    import pyarrow.parquet as pq
    tmp, rows, names, files = hf_data
    src = _source(str(tmp / "data"), workers=2, parquet={"shuffle_buffer": 3})
    assert src._keep == 2 + 3  # the smallest row group holds 1 row: 3 samples span <= 5 groups
    for i in range(16):
        src.read(i)
    assert len(src._cache) == src._keep and src._handles
    blob = pickle.dumps(src)
    assert len(blob) < 8000 and b"pyarrow" not in blob
    clone = pickle.loads(blob)
    assert not hasattr(clone, "_cache") and clone.read(5).data == rows[5][0]

    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))
    order, got = src.order, []
    assert order.streams == 2 and len(order) == 4
    group_of = lambda ids: set(np.searchsorted(src.group_start, ids, side="right") - 1)  # noqa: E731
    for j in range(2):
        worker, reads[:] = pickle.loads(blob), []
        mine = [order.batch(1, g) for g in range(j, len(order), 2)]
        for g in range(j, len(order), 2):
            batch = worker.read_batch(1, g)
            assert [r.data for r in batch] == [rows[i][0] for i in order.batch(1, g)]
            got += [r.sid for r in batch]
        assert len(reads) == len(group_of(np.concatenate(mine))), (j, reads)
    assert sorted(got) == sorted(order.ids(1)) and len(set(got)) == 16
    assert not np.array_equal(order.ids(1), order.ids(2))  # the row-group order changes per epoch


@NEED_DATASETS
def test_parquet_big_row_groups_and_missing_pyarrow_are_one_line_errors(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import fastcls.data.parquet as pqsrc
    idx = scan_folder(str(index_folder(tmp_path / "i", per_class=(2, 2, 2))))
    pq.write_table(pa.table({"image": pa.array([Path(p).read_bytes() for p, _ in idx.samples], pa.binary()),
                             "label": [lab for _, lab in idx.samples]}), tmp_path / "d.parquet")
    monkeypatch.setattr(pqsrc, "ROW_GROUP_LIMIT", 100)
    with pytest.raises(DatasetError, match=r"has a row group of .* rewrite it with small row groups"):
        _source(tmp_path / "d.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DatasetError, match=r"need pyarrow: pip install 'fastcls\[parquet\]'"):
        build_loader(loader_cfg(tmp_path / "d.parquet"), "train", CPU)


@NEED_DATASETS
def test_parquet_check_tool_lists_the_bad_rows(zoo_data, capsys):
    """python -m fastcls.tools.check on Parquet files: every bad row named file:#row, exit 1."""
    from fastcls.tools.check import main
    paths, names, _ = zoo_data
    assert main([paths["parquet"], "--workers", "1", "--no-progress"]) == 1
    out, err = capsys.readouterr()
    bad = [line.split("\t")[0] for line in out.splitlines()]
    assert sorted(ZOO_NAMES[n] for n in bad) == sorted([Path(n).stem for n in ZOO_BAD] + PARQUET_ONLY_BAD)
    assert f"checked {len(names['parquet'])} images: {len(bad)} bad" in err


@NEED_DATASETS
def test_parquet_converts_to_shards(hf_data, tmp_path):
    """convert --to wds from Parquet: every row once, its bytes and label, the Hub's classes."""
    from fastcls.data.shards import iter_shard, open_shards
    from fastcls.tools.convert import main
    tmp, rows, names, files = hf_data
    assert main(["--to", "wds", str(tmp / "data" / "train-*.parquet"), str(tmp_path / "s"), "--per-shard", "5",
                 "--workers", "1", "--no-progress"]) == 0
    shards = open_shards(str(tmp_path / "s"))
    assert shards.classes == names and shards.num_samples == 16 and os.path.basename(shards.index) == "train.shards.json"
    got = sorted((s.data, s.label) for u in shards.urls for s in iter_shard(u))
    assert got == sorted((b, lab) for b, _, lab in rows)


@NEED_DATASETS
def test_parquet_converts_to_beton(hf_data, tmp_path):
    """convert --to ffcv from Parquet (its own process: FFCV's writer forks): every row, the
    Hub's classes in the sidecar."""
    pytest.importorskip("ffcv")
    tmp, rows, names, files = hf_data
    out = tmp_path / "train.beton"
    proc = subprocess.run([PY, "-m", "fastcls.tools.convert", "--to", "ffcv", str(tmp / "saved"), str(out),
                           "--write-mode", "raw", "--workers", "1", "--no-progress"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["classes"] == names and meta["num_samples"] == 16 and meta["skipped"] == []


@NEED_DATASETS
def test_parquet_trains_two_epochs_and_the_checkpoint_keeps_the_hub_classes(hf_data, tmp_path):
    """fastcls.train from Parquet files (train) and a save_to_disk folder (val), 2 short
    epochs: the run's classes are the ClassLabel names, in the Hub's order; fastcls.predict
    reads the Parquet rows."""
    from fastcls import checkpoint
    from fastcls.train import main
    tmp, rows, names, files = hf_data
    out = tmp_path / "run"
    assert main(["pipelines/demo.yaml", f"data.train={tmp / 'data'}", f"data.val={tmp / 'saved'}",
                 "data.demo=false", "model.num_classes=6", "data.batch_size=4", "data.image_size=32",
                 "data.val_resize=32", "data.workers=0", "train.progress=false", f"train.out_dir={out}",
                 "train.epochs=2", "schedule.warmup_epochs=1", "train.amp=off"]) == 0
    rows_ = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_) == 2 and rows_[-1]["val_images"] == 16
    assert checkpoint.load(out / "last.pt")["classes"] == names
    # fastcls.predict on the Parquet files: one line per row, named file:#row, the Hub's names
    from fastcls.predict import main as predict
    assert predict([str(out / "last.pt"), str(tmp / "data" / "train-*.parquet"), "--out", str(tmp_path / "p.jsonl"),
                    "--workers", "0", "--topk", "2"]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["path"] for p in preds] == [f"{f.name}:#{r}" for f in files for r in range(4)]
    assert all(len(p["top"]) == 2 and p["top"][0]["class"] in names for p in preds)


# ---------------------------------------------------------------- end to end

@pytest.mark.demo
@pytest.mark.timeout(900)  # ~2.5 min on an idle 2-core box
@NEED_DATASETS
def test_demo_trains_to_the_bar_from_parquet_on_dali_validated_on_shards(demo_cache, tmp_path):
    """The demo recipe trained from Parquet (Hugging Face's files: Image + ClassLabel, 3 files
    of 98-row groups) on the DALI graph, validated on tar shards of the val split, reaches the
    folders' bar, and its fit verdict settles (seed 2; test_train.py trains it from folders
    on the PIL workers, seed 0, test_ffcv.py from a .beton, seed 1). One run covers two
    sources end to end: Parquet's row-group plan in training, every shard image scored once
    with training's classes. The other cells share these paths' code: the matrix above shows
    each source gives every path the same samples, crops and labels."""
    pytest.importorskip("nvidia.dali")
    demo = demo_cache / "demo-v1"
    train = forms(demo / "train", tmp_path / "train", per_shard=100)[0]["parquet"]
    val = forms(demo / "val", tmp_path / "val", per_shard=100)[0]["shards"]
    out = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "fastcls.train", "pipelines/demo.yaml", f"train.out_dir={out}",
                           f"data.train={train}", f"data.val={val}", "train.seed=2",
                           "train.progress=false", "data.backend=dali"],
                          cwd=ROOT, env=run_env(demo_cache), capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["val_images"] == 200
    assert rows[-1]["val_top1"] > 80.0, rows[-1]  # the demo's bar (test_train.py)
    assert_verdict_stable(out, max_changes=2, final="healthy")
    from fastcls import checkpoint
    assert checkpoint.load(out / "last.pt")["classes"] == sorted(p.name for p in (demo / "train").iterdir())


# ---------------------------------------------------------------- CUDA (gpu machines)

@pytest.mark.gpu
@pytest.mark.parametrize("source, path", CELLS)
def test_cuda_contract(id_data, source, path):
    dev = torch.device("cuda")
    p = id_data[0][source]
    cfg = path_cfg(path, p, p, workers=2)
    train = build_loader(cfg, "train", dev, dtype=torch.bfloat16)
    check_contract(train, dtype=torch.bfloat16, device=dev, tol=0.02)  # bf16 rounding
    val = build_loader(cfg, "val", dev, classes=train.classes)
    assert sorted(i for x, _ in val for i in ids(x.float().cpu())) == list(range(48))
    close(train, val)


def test_matrix_covers_every_source_and_backend_path():
    """A new Source or decode path must join the matrix (and a new backend its own file)."""
    from fastcls.data import BUILDERS, SOURCES
    assert {s.__name__ for s in SOURCES} == {"ParquetSource", "ShardSource", "FolderSource"}
    assert set(BUILDERS) == {"native", "dali", "ffcv", "synthetic"}
    assert {getattr(p, "values", [p])[0].split(":")[0] for p in PATHS} == {"workers", "batched", "dali"}


# ---------------------------------------------------------------- workers die with their parent

@pytest.mark.parametrize("pdeathsig", [True, False])
def test_die_with_parent_ends_a_worker_of_a_killed_parent(pdeathsig):
    """workers.die_with_parent (called in DALI's Python workers): a process whose parent is
    SIGKILLed ends too, by PR_SET_PDEATHSIG or, without it, by its parent watch."""
    import os
    import signal
    import time

    from fastcls.data.workers import die_with_parent
    r, w = os.pipe()
    mid = os.fork()
    if mid == 0:  # the "trainer"
        try:
            if os.fork() == 0:  # its "worker"
                how = die_with_parent(os.getppid(), pdeathsig=pdeathsig, poll_s=0.05)
                os.write(w, f"{os.getpid()} {how}\n".encode())
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    pid, how = os.read(r, 100).decode().split()
    os.kill(mid, signal.SIGKILL)
    os.waitpid(mid, 0)
    assert how == ("pdeathsig" if pdeathsig else "watch")

    def alive(p):
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    end = time.time() + 5
    while alive(pid) and time.time() < end:
        time.sleep(0.05)
    assert not alive(pid)
