"""Screen file bytes before any decoder sees them.

A C++ decoder (DALI, nvImageCodec, nvJPEG) that is handed something that is not an image can
crash the whole process (seen: an HTML error page saved as `x.jpeg`, in a DALI CPU pipeline,
killed by SIGSEGV), and a crash cannot be caught. So every folder backend checks each file's
leading bytes where it reads them anyway (a worker, a DALI source) and counts what fails
as a bad file, like any other undecodable file.

Accepted: the formats every decoder of every backend reads (PIL, torchvision, nvImageCodec,
DALI): JPEG, PNG, BMP, TIFF, WebP. Anything else (HTML, text, GIF, zero bytes, ...) is
refused here, on every backend alike.
"""
from __future__ import annotations

from typing import Optional

# (leading bytes, offset) -> format; WebP is "RIFF" + size + "WEBP".
_SIGNATURES = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
)
HEAD_BYTES = 16  # enough for every signature above


def image_format(head: bytes) -> Optional[str]:
    """"JPEG" | "PNG" | "BMP" | "TIFF" | "WEBP" from a file's first bytes, else None."""
    for sig, at, name in _SIGNATURES:
        if head[at:at + len(sig)] == sig and (name != "WEBP" or head[:4] == b"RIFF"):
            return name
    return None


def jpeg_truncated(raw: bytes) -> bool:
    """True for a JPEG cut short: no end-of-image marker (FF D9) after its last start-of-scan
    (FF DA). libjpeg refuses such files but GPU decoders may return them half grey, so
    they are caught here, the same for every decoder. (Entropy-coded data cannot contain
    FF D9: a data FF byte is always followed by 00; trailing bytes after EOI are allowed.)"""
    if raw[:2] != b"\xff\xd8":
        return False
    return raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda")


def screen(raw: bytes) -> Optional[str]:
    """None when `raw` may go to a decoder, else the reason it may not."""
    if not raw:
        return "empty file (0 bytes)"
    fmt = image_format(raw[:HEAD_BYTES])
    if fmt is None:
        shown = raw[:HEAD_BYTES].decode("latin-1").encode("unicode_escape").decode()[:40]
        return f"not an image file (first bytes {shown!r}; JPEG, PNG, BMP, TIFF or WebP expected)"
    if fmt == "JPEG" and jpeg_truncated(raw):
        return "truncated JPEG (no end-of-image marker)"
    return None


def read_screened(path: str) -> tuple[bytes, Optional[str]]:
    """(the file's bytes, None) or (b"", the reason it cannot be decoded)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return b"", f"{type(e).__name__}: {e}"
    why = screen(raw)
    return (b"", why) if why else (raw, None)
