"""The per-sample decisions, written once and called by every decode path (docs/design.md):

- `Raw`: one sample as a Source reads it: screened bytes, label, sample id, name, error;
- `screen`: which bytes may reach a decoder at all;
- `sample_rng` and `candidates`: the per-sample generators and the replacement rule;
- `train_crop`: THE draw of a training crop box and flip (torchvision's RandomResizedCrop);
- `val_box`: the validation window (torchvision's Resize + CenterCrop);
- `header_size`, `strict_error`: what a worker and the DALI loader learn from the bytes.

A crop depends only on (seed, epoch, sample id) and the image's header size, never on
which worker, process or decode path draws it: so every path gives the same boxes and
flips, and a resumed epoch repeats the uninterrupted one's.

Screening: a C++ decoder (DALI, nvImageCodec, nvJPEG) handed something that is not an image
can crash the whole process (seen: an HTML error page saved as `x.jpeg` killed a DALI CPU
pipeline with SIGSEGV), and a crash cannot be caught. So every Source screens the bytes it
reads; what fails is a bad sample like any undecodable one. Accepted: JPEG, PNG, BMP, TIFF,
WebP (what every decoder of every path reads); anything else is refused on every path.
"""
from __future__ import annotations

import io
import math
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

TRIES = 10  # a sample and its replacements tried in training before the run stops


class Raw(NamedTuple):
    """One sample as a Source reads it: the encoded image bytes (b"" when unusable), the
    class index, the sample id (its position in the Source: seeds its crop), how messages
    name it, and why it cannot be used (None when it may go to a decoder)."""
    data: bytes
    label: int
    sid: int
    name: str
    error: Optional[str] = None


class Crop(NamedTuple):
    """A training crop in source pixels of an image_width x image_height image, and whether
    the output is mirrored."""
    top: int
    left: int
    height: int
    width: int
    flip: bool
    image_height: int
    image_width: int


# --------------------------------------------------------------------------- screening

# (leading bytes, offset, format); WebP is "RIFF" + size + "WEBP".
_SIGNATURES = ((b"\xff\xd8\xff", 0, "JPEG"), (b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"BM", 0, "BMP"),
               (b"II*\x00", 0, "TIFF"), (b"MM\x00*", 0, "TIFF"), (b"WEBP", 8, "WEBP"))
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


def read_screened(path: str, label: int, sid: int) -> Raw:
    """The file at `path` as a Raw: its bytes, or b"" and why it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return Raw(b"", label, sid, path, f"{type(e).__name__}: {e}")
    why = screen(raw)
    return Raw(b"" if why else raw, label, sid, path, why)


def header_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from the image header (PIL, lazy: nothing is decoded)."""
    from PIL import Image
    with Image.open(io.BytesIO(raw)) as im:
        return im.size


# JPEG start-of-frame markers. Huffman-coded, 8-bit: C0 baseline, C1 extended, C2 progressive.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_needs_cpu(raw) -> bool:
    """Whether a JPEG should not go into a GPU batch decode (torchvision's CUDA `decode_jpeg`,
    nvJPEG): 4 components (CMYK/YCCK: one such file fails the whole batched call, and then all
    of its images are redone one by one, ~0.3-0.5 s at batch 256; ImageNet has ~22), a
    precision other than 8 bits, or a frame nvJPEG does not decode (lossless, hierarchical,
    arithmetic coding). Read from the frame header (a few marker hops, nothing decoded);
    False for anything else, non-JPEGs included (their own checks handle them). `raw`:
    bytes or a uint8 numpy array."""
    n = len(raw)
    if n < 4 or raw[0] != 0xFF or raw[1] != 0xD8:
        return False
    i = 2
    while i + 9 < n:
        if raw[i] != 0xFF:
            return False  # not at a marker: leave it to the decoder
        m = raw[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in _SOF:
            return m not in (0xC0, 0xC1, 0xC2) or raw[i + 4] != 8 or raw[i + 9] not in (1, 3)
        if m in (0xDA, 0xD9):  # a scan or the end before any frame header
            return False
        i += 2 + ((raw[i + 2] << 8) | raw[i + 3])
    return False


def strict_error(raw: bytes, torchvision: bool = True) -> Optional[str]:
    """Why `raw` does not fully decode with PIL and (`torchvision`) with torchvision's
    libjpeg-turbo/libpng readers (closer to nvJPEG/DALI/FFCV in what they refuse), or None."""
    try:
        if not raw:
            return "empty file (0 bytes)"
        from PIL import Image
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # full decode: raises on truncated data (LOAD_TRUNCATED_IMAGES is off)
            w, h = im.size
            im.convert("RGB")
        if w < 1 or h < 1:
            return f"empty image {w}x{h}"
        if not torchvision:
            return None
        import torch
        from torchvision.io import ImageReadMode, decode_image
        decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as e:  # PIL and torchvision raise many types for bad data
        return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    return None


# --------------------------------------------------------------------------- randomness

def sample_rng(seed: int, epoch: int, sid: int, attempt: int = 0) -> np.random.Generator:
    """The generator of sample `sid` in `epoch` (attempt 0) or of its replacement attempt k:
    the only place per-sample generators are seeded."""
    return np.random.default_rng((seed, epoch, sid) if attempt == 0 else (seed, epoch, sid, attempt))


def candidates(source, raw: Raw, epoch: int, seed: int, *, train: bool,
               batch: Sequence[Raw] = (), start: int = 0) -> Iterator[tuple[int, Raw, np.random.Generator]]:
    """The replacement rule. Yields (attempt, sample, generator): the sample itself with its
    own generator (attempt 0), then in training up to TRIES - 1 replacements, attempt k
    drawn from `sample_rng(seed, epoch, sid, k)` among all samples when the source reads
    by position (`source.random_access`), else among `batch` (a stream's batch in hand);
    the caller draws the crop of the one it keeps from the same generator. `start`: the
    first attempt (a path that found attempt k-1 undecodable late goes on at k). Evaluation
    has no replacements: a bad validation sample is dropped, so no image counts twice."""
    if start == 0:
        yield 0, raw, sample_rng(seed, epoch, raw.sid)
    for k in range(max(1, start), TRIES if train else 1):
        rng = sample_rng(seed, epoch, raw.sid, k)
        if source.random_access:
            yield k, source.read(int(rng.integers(source.num_samples))), rng
        elif batch:
            yield k, batch[int(rng.integers(len(batch)))], rng


def sample_rrc(width: int, height: int, scale: tuple[float, float],
               ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) in pixels of a width x height image, the algorithm of
    `torchvision.transforms.v2.RandomResizedCrop.get_params`: up to 10 tries of area ~
    U(scale) * image area and log-aspect ~ U(log ratio); the first box that fits wins, else a
    center crop with the aspect ratio clamped to `ratio`. Drawn from an explicit generator
    (torchvision's uses the global torch RNG), so the box is a function of the sample."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop(width: int, height: int, rng: np.random.Generator, scale: Sequence[float],
               ratio: Sequence[float], hflip: float) -> Crop:
    """THE training crop and flip of a width x height image, from the sample's generator
    (see `candidates`): every decode path calls this and nothing else draws a crop."""
    top, left, h, w = sample_rrc(width, height, (scale[0], scale[1]), (ratio[0], ratio[1]), rng)
    return Crop(top, left, h, w, bool(rng.random() < hflip), height, width)


def val_box(width: int, height: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, box_w, box_h) in source pixels that torchvision's `Resize(resize)`
    (shorter side, its rounding of the longer) then `CenterCrop(size)` maps onto the output."""
    short, long = min(width, height), max(width, height)
    new_long = int(resize * long / short)
    new_w, new_h = (resize, new_long) if width <= height else (new_long, resize)
    sx, sy = width / new_w, height / new_h
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return left * sx, top * sy, min(size * sx, width), min(size * sy, height)
