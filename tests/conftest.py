"""Shared fixtures: small ImageFolders generated into tmp dirs (never downloaded)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on the 2-core CI machine: one OpenMP thread
    # per process (and per subprocess it starts), or two processes' spinning OpenMP threads
    # starve each other (measured: a demo run 1.5 min alone, 12 min beside another run).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from fastcls.config import config_from_dict
from fastcls.data.base import MEAN, STD, Loader

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# The value range of ImageNet-normalized 0..255 pixels, over the three channels.
NORM_LO = min((0 - m) / s for m, s in zip(MEAN, STD))
NORM_HI = max((255 - m) / s for m, s in zip(MEAN, STD))
# make_folder()'s default folder (7, 5, 6 images) in scan order: every image once.
FOLDER_LABELS = [0] * 7 + [1] * 5 + [2] * 6
BAD_NAMES = ["text.jpg", "trunc.jpg", "zero.jpg"]  # bad_folder()'s undecodable files


def pytest_collection_modifyitems(config, items):
    # Longest first: the 30-epoch demo runs (marked `demo`), each at the head of its file, and
    # their files before the others, so that under `make test`'s two xdist workers (whole
    # files per worker) the short tests fill the time beside them rather than one demo run
    # finishing alone at the end. The sort is stable: every other order is kept.
    demo_files = {item.path for item in items if item.get_closest_marker("demo")}
    items.sort(key=lambda item: (item.path not in demo_files, not item.get_closest_marker("demo")))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `python -m pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_image(path: Path, rng: np.random.Generator, size=None, mode="RGB", fmt="JPEG") -> None:
    w, h = size or (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_folder(root: Path, classes=("a", "b", "c"), per_class=(7, 5, 6), seed=0) -> Path:
    """root/<class>/NN.jpg with random-noise JPEGs of random sizes."""
    rng = np.random.default_rng(seed)
    for cls, n in zip(classes, per_class):
        for i in range(n):
            write_image(root / cls / f"{i:02d}.jpg", rng)
    return root


def write_odd_images(dirs, rng: np.random.Generator) -> None:
    """Decodable files that are not plain RGB JPEGs, in the 4 folders `dirs` in turn:
    gray.jpg (grayscale), cmyk.jpg (CMYK), png_named.jpg (a PNG), tiny.jpg (1x1)."""
    gray, cmyk, png, tiny = (Path(d) for d in dirs)
    write_image(gray / "gray.jpg", rng, mode="L")
    write_image(cmyk / "cmyk.jpg", rng, mode="CMYK")
    write_image(png / "png_named.jpg", rng, fmt="PNG")
    write_image(tiny / "tiny.jpg", rng, size=(1, 1))


def bad_folder(tmp_path: Path) -> Path:
    """2 classes of 10 noise JPEGs, plus a/zero.jpg (empty), a/text.jpg (text) and
    b/trunc.jpg (a third of a JPEG): 23 files, the BAD_NAMES undecodable."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=(10, 10))
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("not an image")
    good = (root / "b" / "00.jpg").read_bytes()
    (root / "b" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    return root


def bad_names(bad_files) -> list[str]:
    """The sorted file names in a loader's bad_files ("path: reason" strings)."""
    return sorted(p.split(":")[0].rsplit("/", 1)[1] for p in bad_files)


def loader_cfg(train, val="", **data):
    """A 3-class resnet_tiny config over folders/files `train`, `val`: batches of 4 images
    32x32 (val: shorter side 36, center crop 32), no workers; `data` overrides."""
    tree = {"model": {"name": "resnet_tiny", "num_classes": 3},
            "data": {"train": str(train), "val": str(val), "batch_size": 4, "image_size": 32,
                     "val_resize": 36, "workers": 0, **data}}
    return config_from_dict(tree)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalized N×3×H×W images -> float pixel values in 0..255 units."""
    return x.float() * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and device.index in (None, t.device.index)


def check_contract(loader, batches=None, *, batch=4, size=32, dtype=torch.float32,
                   device=CPU, tol=1e-5):
    """The data interface contract (fastcls.data) on one epoch of `loader` (or on its
    `batches`, already taken): len(loader) batches, each of images `dtype`
    batch x 3 x size x size channels_last on `device`, ImageNet-normalized (inside the
    normalized range of 0..255, +-tol), labels int64 (batch,) on `device`. -> the batches."""
    assert isinstance(loader, Loader)  # the protocol every backend satisfies
    batches = list(loader) if batches is None else batches
    assert len(batches) == len(loader)
    for x, y in batches:
        assert x.shape == (batch, 3, size, size) and x.dtype == dtype and _on(x, device)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (batch,) and _on(y, device)
        assert x.float().min() >= NORM_LO - tol and x.float().max() <= NORM_HI + tol
    return batches


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded 2-core box.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "train")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """The real demo dataset, generated once per session into a private cache."""
    from fastcls.tools.demo import ensure_demo_dataset
    root = tmp_path_factory.mktemp("cache")
    ensure_demo_dataset(root)
    return root


def run_env(cache: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cache is not None:
        env["FASTCLS_CACHE"] = str(cache)
    return env


PY = sys.executable


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): IHDR bit depth 16, colour type 2."""
    import struct
    import zlib
    h, w, _ = arr.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


ZOO_BAD = ["gif.jpg", "html.jpeg", "text.jpg", "trunc.jpg", "zero.jpg"]
ZOO_GOOD = ["cmyk.jpg", "gray.jpg", "gray16.png", "plain.jpg", "png_named.jpg", "progressive.jpg",
            "rgb16.png", "rgba.png", "tiny.jpg"]


def zoo_folder(root: Path) -> Path:
    """root/a/: the broken-file zoo in one class folder. Undecodable (ZOO_BAD): an HTML error
    page saved as .jpeg, text, zero bytes, a truncated JPEG, a GIF named .jpg (a format not
    every decoder reads). Decodable (ZOO_GOOD): plain, CMYK, grayscale and progressive
    JPEGs, a PNG named .jpg, 16-bit grayscale and 16-bit RGB PNGs, an RGBA PNG, a 1x1 JPEG."""
    rng = np.random.default_rng(5)
    d = root / "a"
    d.mkdir(parents=True)
    smooth = lambda h, w: (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.uint8)  # noqa: E731
    img = Image.fromarray(np.stack([smooth(50, 70), smooth(50, 70)[::-1], 255 - smooth(50, 70)], -1))
    img.save(d / "plain.jpg", quality=95)
    img.save(d / "progressive.jpg", quality=95, progressive=True)
    img.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    img.convert("L").save(d / "gray.jpg", quality=95)
    img.save(d / "png_named.jpg", format="PNG")
    img.convert("RGBA").save(d / "rgba.png")
    Image.fromarray(smooth(50, 70).astype(np.uint16) * 257).save(d / "gray16.png")
    _png16_rgb(d / "rgb16.png", np.asarray(img).astype(np.uint16) * 257)
    write_image(d / "tiny.jpg", rng, size=(1, 1))
    img.save(d / "gif.jpg", format="GIF")
    (d / "html.jpeg").write_text("<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
                                 "<body><h1>Not Found</h1></body></html>\n")
    (d / "text.jpg").write_text("not an image")
    (d / "zero.jpg").write_bytes(b"")
    good = (d / "plain.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(good[: len(good) // 2])
    return root


def zoo_reference(root: Path, size: int, resize: int) -> dict[str, np.ndarray]:
    """name -> the PIL path's validation crop (uint8 size x size x 3) of each ZOO_GOOD file."""
    from fastcls.data.workers import decode_val
    return {n: decode_val(str(root / "a" / n), size, resize) for n in ZOO_GOOD}


PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket")


def photo_folder(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    """root/<photo>/NNN.jpg: random crops (100-300 px, quality 90) of scikit-image's sample
    photographs, one class per photograph: real JPEG statistics, generated offline."""
    import skimage.data
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(rng.integers(100, min(300, s) + 1)) for s in arr.shape[:2])
            y, x = int(rng.integers(0, arr.shape[0] - h + 1)), int(rng.integers(0, arr.shape[1] - w + 1))
            Image.fromarray(arr[y:y + h, x:x + w]).save(d / f"{i:03d}.jpg", quality=90)
    return root


def index_folder(root: Path, per_class=(16, 16, 16)) -> Path:
    """Solid-colour PNGs whose colour encodes the image's index in scan order (R + 256 G):
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


def digits_folder(root: Path, indices, size: int = 32) -> Path:
    """root/<digit>/NNNN.png: scikit-learn's handwritten digits (UCI; 8x8 px, 17 gray levels,
    shipped with the package) number `indices` of its 1797, upscaled (bilinear) to size px."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i in indices:
        d = root / str(digits.target[i])
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8))
        img.resize((size, size), Image.BILINEAR).save(d / f"{i:04d}.png")
    return root


def assert_verdict_stable(out_dir: Path, max_changes: int = 2, final: str = "healthy") -> list[str]:
    """A run's fit verdicts (metrics.jsonl `fit`, fastcls/diagnose.py): the stated verdict
    (not "provisional") changes at most `max_changes` times, the last record carries the final
    verdict `final` with its trend, and the log fields agree with it. -> the `fit` sequence."""
    import json
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    seq = [r["fit"] for r in rows]
    stated = [v for v in seq if v != "provisional"]
    changes = sum(a != b for a, b in zip(stated, stated[1:]))
    assert changes <= max_changes, f"{changes} changes: {seq}"
    last = rows[-1]
    assert last["fit_final"] == last["fit"] == final, (final, seq, last.get("fit_advice"))
    assert last["fit_advice"].startswith(f"fit (final): {final}")
    assert last["fit_trend"] and last["fit_trend"][-1][0] == last["epoch"]
    assert last["fit_trend_direction"] in ("rising", "falling", "flat")
    return seq
