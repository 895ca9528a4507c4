"""Bad and odd data on the native backend, end to end: what trains as RGB, what is skipped
and counted (and named), what `python -m fastcls.tools.check` rejects up front, and the
one-line errors for unusable dataset paths. (The broken-file zoo on every path: test_data.py.)"""
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastcls.data.workers import decode_train, decode_val
from fastcls.train import main

from conftest import PY, ROOT, make_folder, run_env, write_image, write_odd_images


def bomb_jpeg(src: bytes) -> bytes:
    """A valid small JPEG whose SOF0 header claims 30000x30000 pixels."""
    i = src.index(b"\xff\xc0")
    b = bytearray(src)
    b[i + 5:i + 9] = (30000).to_bytes(2, "big") * 2   # height, width
    return bytes(b)


@pytest.mark.parametrize("kind", ["L", "CMYK", "P", "RGBA", "png_named_jpg", "1x1"])
def test_odd_files_decode_exactly_as_their_rgb_conversion(tmp_path, kind):
    """The decoder's output equals decoding the file's RGB conversion, saved losslessly."""
    rng = np.random.default_rng(1)
    odd = tmp_path / "odd.jpg"
    if kind == "png_named_jpg":
        write_image(odd, rng, size=(70, 50), fmt="PNG")
    elif kind == "1x1":
        write_image(odd, rng, size=(1, 1))
    elif kind in ("P", "RGBA"):
        odd = tmp_path / "odd.png"
        write_image(odd, rng, size=(70, 50), mode=kind, fmt="PNG")
    else:
        write_image(odd, rng, size=(70, 50), mode=kind)
    with Image.open(odd) as im:
        im.convert("RGB").save(tmp_path / "ref.png")
    for fn in (lambda p: decode_val(p, 32, 36),
               lambda p: decode_train(p, 32, (0.3, 1.0), (0.75, 1.33), 0.5, np.random.default_rng(7))):
        got, want = fn(str(odd)), fn(str(tmp_path / "ref.png"))
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), kind


def test_very_large_jpeg_decodes_via_dct_scaling(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (10, 200, 30)).save(path, quality=90)
    t = time.perf_counter()
    out = decode_train(str(path), 32, (0.08, 1.0), (0.75, 1.33), 0.5, np.random.default_rng(0))
    assert time.perf_counter() - t < 10  # draft(): libjpeg decodes at 1/8 scale
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - [10, 200, 30]).max() <= 3


def _matrix(tmp_path):
    """A dataset with every kind of file: 3 classes (one empty), odd-but-fine files, bad files."""
    root = make_folder(tmp_path / "data", classes=("a", "b"), per_class=(12, 12))
    rng = np.random.default_rng(2)
    write_odd_images([root / "a", root / "a", root / "b", root / "b"], rng)
    good = (root / "a" / "00.jpg").read_bytes()
    bad = {"a/zero.jpg": b"", "a/trunc.jpg": good[: len(good) // 2], "b/text.jpg": b"hello",
           "b/bomb.jpg": bomb_jpeg(good)}
    for name, content in bad.items():
        (root / name).write_bytes(content)
    if os.geteuid() != 0:  # root reads any file: an unreadable one can only be made as a user
        (root / "b" / "noperm.jpg").write_bytes(good)
        os.chmod(root / "b" / "noperm.jpg", 0)
        bad["b/noperm.jpg"] = good
    (root / "c_empty").mkdir()
    return root, sorted(bad)


def _run(root, out, *extra):
    return main(["pipelines/demo.yaml", f"data.train={root}", f"data.val={root}", "data.demo=false",
                 "model.num_classes=3", "data.batch_size=8", "data.image_size=32", "data.val_resize=32",
                 "data.workers=0", "train.progress=false", f"train.out_dir={out}", "train.amp=off",
                 "train.epochs=1", *extra])


def test_bad_data_matrix_check_train_and_exclude(tmp_path, capsys):
    root, bad = _matrix(tmp_path)
    # 1. rejected up front, by name
    proc = subprocess.run([PY, "-m", "fastcls.tools.check", str(root), "--no-progress", "--workers", "1",
                           "--exclude-out", str(tmp_path / "bad.txt")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    listed = sorted(os.path.relpath(line.split("\t")[0], root) for line in proc.stdout.splitlines())
    assert listed == bad, proc.stdout
    assert "bomb.jpg\tDecompressionBombError" in proc.stdout
    assert "class folder 'c_empty'" in proc.stderr
    # 2. trained through: skipped, counted, named at the end of the epoch
    assert _run(root, tmp_path / "ok", "data.max_bad_fraction=0.5") == 0
    err = capsys.readouterr().err
    assert "class folder 'c_empty' has no images" in err
    warn = [ln for ln in err.splitlines() if "undecodable files skipped" in ln]
    assert len(warn) == 1 and "epoch 1:" in warn[0], err
    n = int(warn[0].split(": ")[2].split()[0])  # the files this epoch's order drew
    assert 1 <= n <= len(bad) and any(os.path.basename(b) in warn[0] for b in bad)
    assert not any(ok in warn[0] for ok in ("gray.jpg", "cmyk.jpg", "png_named.jpg", "tiny.jpg"))
    # 3. over the configured fraction: a one-line error naming the files, no traceback
    assert _run(root, tmp_path / "strict", "data.max_bad_fraction=0.0") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "max_bad_fraction=0.0" in err
    assert any(os.path.basename(b) in err for b in bad)
    # 4. with the check's exclude list, nothing is left to skip
    assert _run(root, tmp_path / "clean", "data.max_bad_fraction=0.0", f"data.exclude={tmp_path / 'bad.txt'}") == 0
    err = capsys.readouterr().err
    assert "undecodable" not in err


@pytest.mark.parametrize("setup, message", [
    (lambda p: "", "data.train: no folder given"),
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "has no class sub-folders"),
    (lambda p: (p / "noimg" / "a").mkdir(parents=True) or str(p / "noimg"), "no images"),
    (lambda p: (p / "file.jpg").write_text("x") and str(p / "file.jpg"), "is not a directory"),
    (lambda p: (p / "file.txt").write_text("x") and str(p / "file.txt"),  # read as a list file
     "file.txt: line 1: expected 'relative/path label', got 'x'"),
])
def test_unusable_dataset_path_is_one_line_error(tmp_path, capsys, setup, message):
    path = setup(tmp_path)
    rc = main(["pipelines/demo.yaml", f"data.train={path}", f"data.val={path}", "data.demo=false",
               f"train.out_dir={tmp_path / 'o'}", "train.progress=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_hung_file_read_times_out_instead_of_hanging(tmp_path):
    """A worker stuck reading (a FIFO nobody writes: what a hung network filesystem looks
    like to open()) fails after data.timeout with a DatasetError naming the key."""
    from fastcls.config import config_from_dict
    from fastcls.data import DatasetError
    from fastcls.data.base import LoaderSpec
    from fastcls.data.folder import FolderIndex, FolderSource, Table
    from fastcls.data.workers import WorkersLoader
    fifo = tmp_path / "stuck.jpg"
    os.mkfifo(fifo)
    # A Table, not a list file: the list reader takes regular files only (a FIFO is not one).
    index = FolderIndex(str(tmp_path), ["a"], Table(str(tmp_path), ["stuck.jpg"] * 4, [0] * 4), [])
    data = config_from_dict({"model": {"name": "resnet_tiny"}, "data": {
        "batch_size": 2, "image_size": 16, "val_resize": 16, "workers": 1, "pin_memory": False,
        "max_bad_fraction": 0.0, "timeout": 2}}).data
    spec = LoaderSpec(split="val", path=str(tmp_path), data=data, batch_size=2, device=torch.device("cpu"),
                      dtype=torch.float32, rank=0, world_size=1, seed=0, num_classes=1)
    loader = WorkersLoader(FolderSource(index, spec), spec)
    t = time.perf_counter()
    with pytest.raises(DatasetError, match=r"data.timeout=2 s"):
        next(iter(loader))
    loader.close()  # its worker, stuck in open(), is terminated now, not at exit
    assert time.perf_counter() - t < 60
    cfg = config_from_dict({"model": {"name": "resnet_tiny"}, "data": {"batch_size": 2}})
    assert cfg.data.timeout == 600.0
