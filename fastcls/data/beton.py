"""The `.beton` format as fastcls writes it: FFCV's file plus `OUT.beton.json` next to it
(class list, sample count, write options, skipped files), and the guarded `ffcv` import.

Read by the ffcv backend (ffcv_loader.py) and `--print-config` (steps per epoch), written
by the converter (convert.py); neither imports the other for it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .folder import DatasetError

FORMAT = "fastcls-ffcv-v1"
META_SUFFIX = ".json"
INSTALL = ("apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
           "pip install 'fastcls[ffcv]'")


def meta_path(beton: str | os.PathLike) -> Path:
    """The class list / options file written next to a .beton: OUT.beton.json."""
    return Path(str(beton) + META_SUFFIX)


def read_meta(path: str, key: str) -> dict:
    """The class list etc. that the converter wrote next to the .beton `path` (`key` names
    the config key in errors)."""
    p = Path(path)
    if not p.is_file():
        hint = (f"; convert the folder first: python -m fastcls.tools.convert --to ffcv {path} "
                f"{p.name or 'split'}.beton" if p.is_dir() else "")
        raise DatasetError(f"{key}: data.backend=ffcv reads a .beton file, and {path!r} is "
                           f"{'a directory' if p.is_dir() else 'not a file'}{hint}")
    m = meta_path(p)
    if not m.is_file():
        raise DatasetError(f"{key}: {path!r} has no class list {m.name} next to it; write .beton "
                           f"files with: python -m fastcls.tools.convert --to ffcv SRC_DIR {p.name}")
    try:
        meta = json.loads(m.read_text())
        assert meta.get("format") == FORMAT and isinstance(meta["classes"], list)
    except (ValueError, AssertionError, KeyError):
        raise DatasetError(f"{key}: {m} is not a fastcls FFCV metadata file ({FORMAT})") from None
    return meta


def import_ffcv():
    """Import ffcv, keeping torch's thread count (`import ffcv` sets it to 1)."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        import ffcv.fields.decoders  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        return ffcv
    except (ImportError, OSError) as e:  # OSError: a system library (libturbojpeg...) missing
        raise DatasetError(f"data.backend=ffcv: ffcv cannot be imported ({e}); run: {INSTALL}") from None
    finally:
        torch.set_num_threads(threads)
