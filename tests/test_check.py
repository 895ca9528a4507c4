"""`python -m fastcls.tools.check` and `data.exclude`: bad files found up front, then skipped."""
from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from fastcls.config import load_config
from fastcls.data import DatasetError, build_loader, read_exclude, scan_folder
from fastcls.tools.check import check_file, check_paths

from conftest import PY, ROOT, make_folder, run_env, write_odd_images


def _bad_set(root):
    """Corrupt, truncated, zero-byte and text-named-.jpg files next to good odd ones."""
    rng = np.random.default_rng(1)
    write_odd_images([root / "a", root / "a", root / "b", root / "b"], rng)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "zero.jpg").write_bytes(b"")
    (root / "c" / "text.jpg").write_text("not an image\n")
    (root / "c" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    return {"truncated.jpg", "zero.jpg", "text.jpg", "garbage.jpg"}


def test_check_file_reasons(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = _bad_set(root)
    found = {p.split("/")[-1]: why for p, why in check_paths(
        (str(p) for p in sorted(root.rglob("*.jpg"))), workers=1)}
    assert set(found) == bad
    assert found["zero.jpg"] == "empty file (0 bytes)"
    assert "UnidentifiedImageError" in found["text.jpg"]
    assert check_file(str(root / "a" / "00.jpg")) is None


def test_check_cli_lists_bad_files_and_writes_exclude(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = _bad_set(root)
    out = tmp_path / "bad.txt"
    r = subprocess.run([PY, "-m", "fastcls.tools.check", str(root), "--workers", "2",
                        "--exclude-out", str(out), "--no-progress"],
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    listed = {ln.split("\t")[0].split("/")[-1] for ln in r.stdout.splitlines()}
    assert listed == bad
    assert f"checked {18 + 8} images: 4 bad" in r.stderr
    assert {ln.strip().split("/")[-1] for ln in out.read_text().splitlines()} == bad
    # A clean folder exits 0; a missing one exits 2 with a one-line error.
    clean = make_folder(tmp_path / "clean")
    r = subprocess.run([PY, "-m", "fastcls.tools.check", str(clean), "--no-progress"],
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == ""
    r = subprocess.run([PY, "-m", "fastcls.tools.check", str(tmp_path / "nope")],
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_exclude_drops_listed_files_absolute_and_relative(tmp_path):
    root = make_folder(tmp_path / "d")
    lst = tmp_path / "ex.txt"
    lst.write_text(f"# bad ones\n{root / 'a' / '00.jpg'}\nb/01.jpg\n\nc/99.jpg\n")
    idx = scan_folder(str(root), exclude=read_exclude(str(lst)))
    names = {p.split("/")[-2] + "/" + p.split("/")[-1] for p, _ in idx.samples}
    assert idx.excluded == 2 and len(idx.samples) == 18 - 2
    assert "a/00.jpg" not in names and "b/01.jpg" not in names and "a/01.jpg" in names
    with pytest.raises(DatasetError, match="data.exclude: cannot read"):
        read_exclude(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("decode", ["workers", "batched"])
def test_exclude_makes_bad_folder_clean_for_the_loader(tmp_path, decode):
    """check --exclude-out, then data.exclude: the loader meets no bad file at all."""
    root = make_folder(tmp_path / "d")
    _bad_set(root)
    out = tmp_path / "bad.txt"
    subprocess.run([PY, "-m", "fastcls.tools.check", str(root), "--exclude-out", str(out),
                    "--no-progress"], env=run_env(), capture_output=True, timeout=120)
    cfg = load_config(str(ROOT / "pipelines" / "demo.yaml"),
                      [f"data.train={root}", f"data.val={root}", "data.demo=false",
                       "data.batch_size=4", "data.workers=0", f"data.exclude={out}",
                       f"data.native_decode={decode}"])
    loader = build_loader(cfg, "val", torch.device("cpu"))
    seen = sum(len(y) for _, y in loader)
    assert loader.excluded == 4 and seen == 18 + 4 and loader.bad_files == []
