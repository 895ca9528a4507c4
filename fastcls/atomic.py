"""Files written so that a reader sees the old file or the whole new one, never a part:
reports, sidecars, indexes and exports (checkpoints add a digest: checkpoint.save_atomic).
A write that fails for want of space (or any OSError) is a `WriteError`: one line naming
the file, the bytes it needed and the bytes free there."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional


def megabytes(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def free_bytes(path: str | os.PathLike) -> Optional[int]:
    """Bytes free to this user on the filesystem holding `path` (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """`exc` when it is an OSError, else the first OSError it was raised from or during
    (torch.save reports a failed write as RuntimeError 'unexpected pos', the OSError behind it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota, an I/O error): an OSError
    with the errno of `err`, and `path`, `needed` (bytes, when known) and `free` (bytes free
    there, measured after the partial file was removed)."""

    def __init__(self, path: str | os.PathLike, err: OSError, needed: Optional[int] = None):
        self.path, self.needed = Path(path), needed
        self.reason = err.strerror or str(err)
        self.free = free_bytes(self.path.parent)
        super().__init__(err.errno, self.reason)

    def __str__(self) -> str:
        need = f"needs about {megabytes(self.needed)}, " if self.needed else ""
        return f"cannot write {self.path}: {self.reason} ({need}{megabytes(self.free)} free there)"


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temp file beside `path`, fsync it, rename it over `path`.
    WriteError (the temp file removed, `path` untouched) when it cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: some writers/readers check it (torch.export wants .pt2)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
