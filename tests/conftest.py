"""Shared fixtures: small ImageFolders generated into tmp dirs (never downloaded)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "train")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """The real demo dataset, generated once per session into a private cache."""
    from fastcls.data.demo import ensure_demo_dataset
    root = tmp_path_factory.mktemp("cache")
    ensure_demo_dataset(root)
    return root


def run_env(cache: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cache is not None:
        env["FASTCLS_CACHE"] = str(cache)
    return env


PY = sys.executable
