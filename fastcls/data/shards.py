"""Tar shards in the WebDataset layout: the shard Source, on every decode path.

A shard set is `<prefix>-000000.tar ... <prefix>-NNNNNN.tar`, each sample two tar members
`<key>.jpg` (the original image bytes; `.png`, `.webp`, ... too) and `<key>.cls` (the class
index as ASCII), plus the index `<prefix>.shards.json` next to them (written by
`python -m fastcls.tools.convert --to wds`): format, classes, num_samples, and per shard its
name, sample count, bytes and the byte offset of each sample's first tar header.

`data.train` / `data.val` name a shard set as the index, a folder holding one index (or only
shards), a brace pattern `/d/train-{000000..000127}.tar` (a subset of the index's shards is
fine) or `pipe:` URLs (`pipe:cat /d/train-{000000..000009}.tar`, `pipe:aws s3 cp s3://b/train-
{000000..000127}.tar -`): the index of a pattern is its first shard's URL with
`<prefix>-NNNNNN.tar` replaced by `<prefix>.shards.json`. Local shards without an index are
counted by reading their tar headers once; `python -m fastcls.tools.shard_index SHARDS OUT` writes
an index for shards from elsewhere (any URL).

**The epoch order** (`ShardPlan`) is a function of the per-shard counts alone, so every rank
and worker computes it without reading data, and any batch of it can be located:

1. train: the shards are put in an order seeded by (seed, epoch) (validation: index order)
   and concatenated into one sequence of N sample positions;
2. rank r takes the contiguous range [r*N//W, (r+1)*N//W) of it (train: the first
   (N//W)//B*B of those, full batches only), so ranks read disjoint samples, the same number,
   each a run of whole shards plus at most a part of one shard at each end, and validation
   scores every image once;
3. the rank's range is cut into `streams` contiguous runs (one per DataLoader worker); run j
   holds the global batches g = j, j+K, j+2K, ... (K streams), the order in which a
   DataLoader with K workers hands batches out;
4. train: within its run, stream j emits the sample at run position q in the order of
   q + S*u_q (u_q ~ U[0,1) seeded by (seed, epoch, rank, j); S = data.wds.shuffle_buffer):
   a seeded buffer shuffle in which a sample waits in memory until at most S later samples
   were read, computable from indices alone.

**Resume** at batch k: each stream seeks to the first (shard, member) position its
remaining batches use (at most S samples before the next unread one) and reads on; the
samples it emitted before k are skipped without being decoded. Local shards with offsets in
the index are entered with one seek; a `pipe:` stream reads and drops the members before its
start position. Nothing before that is read: the epoch is not replayed.

fastcls's own plan decides who reads what, not webdataset's pipeline: that splits whole shards
over nodes and workers (uneven samples per rank) and its shuffle buffer cannot be seeked.
webdataset opens URLs (`gopen`: files, `pipe:`, http), names members (`base_plus_ext`) and
writes tars (`TarWriter`). `ShardSource` streams a batch (`read_batch`) or reads a sample by
position (`read`: local shards with offsets only; else a replacement stays in its batch).
Every member is screened as files are.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .folder import IMAGE_EXTENSIONS
from .sample import Raw, screen
from .source import DatasetError, Order, Source

FORMAT = "fastcls-wds-v1"
INDEX_SUFFIX = ".shards.json"  # a shard set's index
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_SHARD_NAME = re.compile(r"([^/\s]*?)-\d+\.tar")
_META = re.compile(r"(^|/)__[^/]*__($|/)")  # webdataset's metadata members, skipped
_SHARD_TAG, _STREAM_TAG = 7_001, 7_002     # distinct seed streams for shard order and buffer


def is_local(url: str) -> bool:
    """A path (or file: URL), not pipe:/http:/s3:... ."""
    return url.startswith("file:") or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)


def is_shards(path: str) -> bool:
    """Does `path` name a shard set (index, .tar, brace pattern, URL, folder of shards)?"""
    if not path:
        return False
    low = path.lower()
    if not is_local(path) or low.endswith((".tar", ".json")) or ("{" in path and ".tar" in low):
        return True
    if os.path.isdir(path):
        entries = list(os.scandir(path))
        if any(e.name.endswith(INDEX_SUFFIX) for e in entries):
            return True
        return any(e.name.endswith(".tar") for e in entries) and not any(
            e.is_dir() and not e.name.startswith(".") for e in entries)
    return False


# --------------------------------------------------------------------------- shard sets

def _open(url: str):
    if is_local(url):  # 1 MiB reads: few, large requests to a network file system
        return open(re.sub(r"^file://?", "/", url) if url.startswith("file:") else url, "rb",
                    buffering=1 << 20)
    return _need("webdataset.gopen").gopen(url, "rb")  # pipe:, http(s) via curl, ...


@dataclass
class ShardSet:
    """What a shard set holds: one entry per shard (urls, counts, offsets: the byte offset
    of each sample's first header, None when unknown), the classes, where it came from."""
    urls: list[str]
    counts: np.ndarray
    offsets: list[Optional[np.ndarray]]
    classes: list[str]
    index: str = ""                    # the index file read ("" when the headers were scanned)
    empty_classes: list[str] = field(default_factory=list)
    excluded: int = 0

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())


def _need(module: str):
    """Import webdataset / braceexpand (install_requires) or say how to get them."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetError(f"tar shards need the webdataset package ({module} is missing): "
                           f"pip install webdataset") from None


def expand_urls(path: str) -> list[str]:
    return list(_need("braceexpand").braceexpand(path))  # webdataset's dependency


def read_index(url: str, key: str) -> dict:
    try:
        with _open(url) as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{key}: cannot read the shard index {url!r}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
            not isinstance(meta.get("shards"), list) or not isinstance(meta.get("classes"), list):
        raise DatasetError(f"{key}: {url!r} is not a fastcls shard index ({FORMAT}); write shards "
                           f"with python -m fastcls.tools.convert --to wds")
    return meta


def _beside(url: str, old: str, new: str) -> str:
    """`url` with its file name `old` (last occurrence) replaced by `new`."""
    if is_local(url):
        return os.path.join(os.path.dirname(url), new)
    i = url.rfind(old)
    return url[:i] + new + url[i + len(old):]


def _index_of(url: str) -> Optional[str]:
    """The index URL of a shard URL: <prefix>-NNNNNN.tar -> <prefix>.shards.json."""
    m = None
    for m in _SHARD_NAME.finditer(url):
        pass
    if m is None:
        return None
    return _beside(url, m.group(0), m.group(1) + INDEX_SUFFIX)


def shard_name(url: str) -> str:
    """The shard's file name in a path or URL (the index keys shards by it)."""
    if is_local(url):
        return os.path.basename(url)
    names = re.findall(r"[^/\s'\"]*\.tar", url)
    return names[-1] if names else url


def _from_index(meta: dict, index_url: str, urls: Optional[list[str]], key: str) -> ShardSet:
    """The ShardSet of an index; `urls`: only these of its shards (a pattern's subset)."""
    entries = {s["name"]: s for s in meta["shards"]}
    if urls is None:
        own = os.path.basename(index_url) if is_local(index_url) else \
            re.findall(r"[^/\s'\"]*" + re.escape(INDEX_SUFFIX), index_url)[-1]
        names = [s["name"] for s in meta["shards"]]
        urls = [_beside(index_url, own, n) for n in names]
    else:
        names = [shard_name(u) for u in urls]
        missing = [n for n in names if n not in entries]
        if missing:
            raise DatasetError(f"{key}: shard {missing[0]!r} is not in the index {index_url} "
                               f"({len(missing)} missing); rewrite the index")
    counts = np.array([int(entries[n]["count"]) for n in names], np.int64)
    offsets = [np.asarray(entries[n]["offsets"], np.int64) if entries[n].get("offsets") else None
               for n in names]
    return ShardSet(list(urls), counts, offsets, list(meta["classes"]), index=index_url,
                    empty_classes=list(meta.get("empty_classes", [])))


def open_shards(path: str, key: str = "data.train",
                classes: Optional[Sequence[str]] = None) -> ShardSet:
    """The shard set `path` names (see the module docstring). `classes` (validation): the
    training classes, which the index's must equal."""
    if not path:
        raise DatasetError(f"{key}: no shards given")
    urls: Optional[list[str]] = None
    index_url: Optional[str] = None
    if path.lower().endswith(".json"):
        index_url = path
    elif is_local(path) and os.path.isdir(path):
        found = sorted(e.name for e in os.scandir(path) if e.name.endswith(INDEX_SUFFIX))
        if len(found) > 1:
            raise DatasetError(f"{key}: {path!r} holds several shard indexes ({', '.join(found)}); "
                               f"name one, e.g. {key}={os.path.join(path, found[0])}")
        if found:
            index_url = os.path.join(path, found[0])
        else:
            urls = sorted(os.path.join(path, e.name) for e in os.scandir(path)
                          if e.name.endswith(".tar"))
            if not urls:
                raise DatasetError(f"{key}: {path!r} holds no .tar shards")
    else:
        urls = expand_urls(path)
        guess = _index_of(urls[0])
        if guess and (not is_local(guess) or os.path.isfile(guess)):
            index_url = guess
    if index_url is not None:
        try:
            meta = read_index(index_url, key)
        except DatasetError as e:
            if urls is None or is_local(index_url):
                raise
            raise DatasetError(f"{e}; no shard index for {path!r}: write one with python -m "
                               f"fastcls.tools.shard_index '{path}' OUT{INDEX_SUFFIX} and put it "
                               f"there") from None
        shards = _from_index(meta, index_url, urls, key)
    elif is_local(urls[0]):
        gone = [u for u in urls if not os.path.isfile(u)]
        if gone:
            raise DatasetError(f"{key}: shard {gone[0]!r} does not exist ({len(gone)} missing)")
        shards = scan_shards(urls, key)
    else:
        raise DatasetError(f"{key}: no shard index for {path!r}; write one: python -m "
                           f"fastcls.tools.shard_index '{path}' OUT{INDEX_SUFFIX}")
    if shards.num_samples == 0:
        raise DatasetError(f"{key}: the shards of {path!r} hold no samples")
    if is_local(shards.urls[0]):
        gone = [u for u in shards.urls if not os.path.isfile(u)]
        if gone:
            raise DatasetError(f"{key}: shard {gone[0]!r} of {index_url} does not exist "
                               f"({len(gone)} missing)")
    if classes is not None and list(classes) != shards.classes:
        if shards.index or len(shards.classes) > len(classes):
            raise DatasetError(f"{key}: the shards' classes differ from training's "
                               f"({len(shards.classes)} vs {len(classes)} classes)")
        shards.classes = list(classes)  # scanned shards: labels only, within training's range
    return shards


# --------------------------------------------------------------------------- tar reading

def split_name(name: str) -> tuple[Optional[str], str]:
    """WebDataset's convention: `dir/key.ext.more` -> ("dir/key", "ext.more"): the key
    ends at the first dot of the file name (as webdataset.tariterators.base_plus_ext)."""
    d, _, base = name.rpartition("/")
    k, dot, ext = base.partition(".")
    if not dot or not k:
        return None, ""
    return (f"{d}/{k}" if d else k), ext.lower()


def iter_shard(url: str, m0: int = 0, m1: Optional[int] = None, *, sid0: int = 0,
               offsets: Optional[np.ndarray] = None, data: bool = True,
               num_classes: Optional[int] = None, key: str = "data",
               fileobj=None) -> Iterator[Raw]:
    """Samples m0..m1-1 of the shard `url`, streamed (one open; a local shard with
    `offsets` is entered at sample m0 with one seek, anything else reads through the
    members before it). A sample is the run of consecutive members sharing a key; its
    image member and `.cls` are read (`data=False`: only `.cls`; data is b"").
    `fileobj`: an open handle of the local shard to use (and leave open) instead."""
    name = shard_name(url)
    try:
        f = _open(url) if fileobj is None else fileobj
    except OSError as e:
        raise DatasetError(f"{key}: cannot open shard {url!r}: {e}") from None
    idx = 0
    try:
        if (m0 or fileobj is not None) and offsets is not None and is_local(url):
            f.seek(int(offsets[m0]))
            idx = m0
        tar = tarfile.open(fileobj=f, mode="r|")
        cur, parts = None, {}
        for ti in tar:
            tar.members = []  # stream mode keeps every TarInfo otherwise
            if not ti.isreg() or _META.search(ti.name):
                continue
            k, ext = split_name(ti.name)
            if k is None:
                continue
            if k != cur:
                if cur is not None:
                    if idx >= m0:
                        yield _sample(name, cur, parts, sid0 + idx, num_classes)
                    idx += 1
                    if m1 is not None and idx >= m1:
                        return
                cur, parts = k, {}
            if idx >= m0 and (ext == "cls" or (data and ext in IMAGE_EXTS)) and ext not in parts:
                parts[ext] = tar.extractfile(ti).read()
        if cur is not None:
            if idx >= m0:
                yield _sample(name, cur, parts, sid0 + idx, num_classes)
            idx += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{key}: shard {url!r} is unreadable at sample {idx}: "
                           f"{type(e).__name__}: {e}") from None
    finally:
        try:
            if fileobj is None:
                f.close()
        except OSError:  # a pipe: command that failed after we stopped reading
            pass
    if m1 is not None and idx < m1:
        raise DatasetError(f"{key}: shard {url!r} has {idx} samples, fewer than its index says "
                           f"({m1}); the index is stale: rewrite the shards or the index")


def _sample(shard: str, key: str, parts: dict, sid: int, num_classes: Optional[int]) -> Raw:
    name = f"{shard}:{key}"
    img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    cls = parts.get("cls")
    try:
        label = int(cls.decode().strip()) if cls is not None else -1
    except (ValueError, UnicodeDecodeError):
        label = -1
    if cls is None or label < 0 or (num_classes is not None and label >= num_classes):
        why = "no .cls member" if cls is None else f".cls {cls[:20]!r} is not a class index" \
            + (f" in 0..{num_classes - 1}" if num_classes else "")
        return Raw(b"", -1, sid, name, why)
    if img is None:
        return Raw(b"", label, sid, name, f"no image member (.{', .'.join(IMAGE_EXTS)})")
    why = screen(img)
    return Raw(b"" if why else img, label, sid, name, why)


def scan_shards(urls: Sequence[str], key: str = "data",
                classes: Optional[Sequence[str]] = None) -> ShardSet:
    """Count the samples of shards without an index (reads headers and .cls members; local
    files seek over the image bytes)."""
    counts, offsets, top = [], [], -1
    for u in urls:
        offs, n = [], 0
        local = is_local(u)
        if local:  # random-access mode: the image bytes are seeked over, not read
            try:
                with tarfile.open(u, mode="r:") as tar:
                    cur = None
                    for ti in tar:
                        k, ext = split_name(ti.name)
                        if not ti.isreg() or _META.search(ti.name) or k is None:
                            continue
                        if k != cur:
                            offs.append(ti.offset)
                            cur, n = k, n + 1
                        if ext == "cls":
                            try:
                                top = max(top, int(tar.extractfile(ti).read().decode().strip()))
                            except ValueError:
                                pass
            except (tarfile.TarError, OSError) as e:
                raise DatasetError(f"{key}: shard {u!r} is unreadable: {e}") from None
        else:
            for s in iter_shard(u, data=False, key=key):
                n += 1
                top = max(top, s.label)
        counts.append(n)
        offsets.append(np.asarray(offs, np.int64) if local else None)
    names = list(classes) if classes is not None else [str(i) for i in range(top + 1)]
    return ShardSet(list(urls), np.asarray(counts, np.int64), offsets, names)


# --------------------------------------------------------------------------- the epoch plan

# --------------------------------------------------------------------------- the epoch plan

class ShardPlan(Order):
    """This rank's epoch over shards of `counts` samples (see the module docstring): global
    batch g of `batch_len(g)` samples (all `batch_size` in training; in validation the last
    may be partial). Computed from the counts alone, never from data."""

    def __init__(self, counts: Sequence[int], batch_size: int, rank: int, world_size: int, *,
                 train: bool, seed: int = 0, streams: int = 1, shuffle_buffer: int = 0):
        super().__init__(batch_size, rank, world_size, train=train, seed=seed)
        self.counts = np.asarray(counts, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.n = int(self.counts.sum())
        self.streams = max(1, streams)
        self.shuffle_buffer = shuffle_buffer if train else 0
        if train:
            per = self.n // world_size
            self.lo, self.steps = rank * per, per // batch_size
            self.images = self.steps * batch_size
        else:
            self.lo = rank * self.n // world_size
            self.images = (rank + 1) * self.n // world_size - self.lo
            self.steps = -(-self.images // batch_size)
        # stream j: global batches j, j+K, ...; contiguous runs of the rank's range, in j order
        sizes = np.full(self.steps, batch_size, np.int64)
        if self.steps:
            sizes[-1] = self.batch_len(self.steps - 1)
        K = self.streams
        self.stream_sizes = np.array([int(sizes[j::K].sum()) for j in range(K)], np.int64)
        self.stream_starts = self.lo + np.concatenate([[0], np.cumsum(self.stream_sizes)[:-1]])
        self._cache: dict = {}
        self._orders: dict = {}  # (epoch, j) -> stream_order, for the latest epoch asked

    def shard_order(self, epoch: int) -> np.ndarray:
        """The epoch's shard order (indices into the shard set)."""
        if not self.train:
            return np.arange(len(self.counts))
        return np.random.default_rng((self.seed, epoch, _SHARD_TAG)).permutation(len(self.counts))

    def _layout(self, epoch: int):
        if epoch not in self._cache:
            self._cache.clear()
            order = self.shard_order(epoch)
            self._cache[epoch] = (order, np.cumsum(self.counts[order]))
        return self._cache[epoch]

    def locate(self, epoch: int, t) -> tuple[np.ndarray, np.ndarray]:
        """Positions t of the epoch's concatenated sequence -> (shard, sample in shard)."""
        order, cum = self._layout(epoch)
        t = np.asarray(t, np.int64)
        k = np.searchsorted(cum, t, side="right")
        return order[k], t - (cum[k] - self.counts[order[k]])

    def stream_order(self, epoch: int, j: int) -> np.ndarray:
        """Stream j's emission order: positions q (0..stream size-1) of its run (read-only).
        Kept for the epoch: each order is a draw and an argsort over the whole stream
        (quadratic per epoch if redone per batch)."""
        if (epoch, j) not in self._orders:
            if any(e != epoch for e, _ in self._orders):
                self._orders.clear()
            c = int(self.stream_sizes[j])
            if self.shuffle_buffer <= 0 or c == 0:
                order = np.arange(c)
            else:
                u = np.random.default_rng((self.seed, epoch, self.rank, j, _STREAM_TAG)).random(c)
                order = np.argsort(np.arange(c) + self.shuffle_buffer * u, kind="stable")
            order.setflags(write=False)
            self._orders[(epoch, j)] = order
        return self._orders[(epoch, j)]

    def batch_positions(self, epoch: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample in shard) of global batch g's samples, in batch order."""
        j, i = g % self.streams, g // self.streams
        q = self.stream_order(epoch, j)[i * self.batch_size: i * self.batch_size + self.batch_len(g)]
        return self.locate(epoch, self.stream_starts[j] + q)

    def batch(self, epoch: int, g: int) -> np.ndarray:
        s, m = self.batch_positions(epoch, g)
        return (self.starts[s] + m).astype(np.int64)

    def runs(self, epoch: int, t0: int, t1: int) -> Iterator[tuple[int, int, int]]:
        """(shard, first, end) runs covering positions [t0, t1) of the epoch's sequence."""
        order, cum = self._layout(epoch)
        t = t0
        while t < t1:
            k = int(np.searchsorted(cum, t, side="right"))
            first = t - int(cum[k] - self.counts[order[k]])
            end = min(int(self.counts[order[k]]), first + (t1 - t))
            yield int(order[k]), first, end
            t += end - first


# --------------------------------------------------------------------------- the source

class _Stream:
    """One stream's reading state in one process: emits its local batches i0, i0+1, ..."""

    def __init__(self, source: "ShardSource", epoch: int, j: int, i0: int):
        plan = source.order
        self.plan, self.epoch, self.j, self.next_i = plan, epoch, j, i0
        self.order = plan.stream_order(epoch, j)
        rest = self.order[i0 * plan.batch_size:]
        self.needed = np.zeros(len(self.order), bool)
        self.needed[rest] = True
        self.cursor = int(rest.min()) if len(rest) else len(self.order)
        self.buf: dict[int, Raw] = {}
        t0 = int(plan.stream_starts[j])
        self.samples = source._stream(epoch, t0 + self.cursor, t0 + len(self.order))

    def take(self, g: int) -> list[Raw]:
        plan, i = self.plan, self.next_i
        qs = self.order[i * plan.batch_size: i * plan.batch_size + plan.batch_len(g)]
        top = int(qs.max())
        while self.cursor <= top:
            s = next(self.samples)
            if self.needed[self.cursor]:
                self.buf[self.cursor] = s
            self.cursor += 1
        self.next_i += 1
        return [self.buf.pop(int(q)) for q in qs]


class ShardSource(Source):
    """A shard set as a Source (see the module docstring). The plan is built once, here,
    with one stream per DataLoader worker (`data.workers`), so every decode path reads the
    same samples in the same order for the same settings."""

    def __init__(self, shards: ShardSet, spec):
        super().__init__(spec)
        self.shards, self.classes = shards, shards.classes
        self.empty_classes = shards.empty_classes
        self.num_samples = shards.num_samples
        self.random_access = all(o is not None for o in shards.offsets) and \
            all(is_local(u) for u in shards.urls)
        s = spec
        self.order = ShardPlan(shards.counts, s.batch_size, s.rank, s.world_size, train=s.train,
                               seed=s.seed, streams=s.data.workers,
                               shuffle_buffer=s.data.wds.shuffle_buffer)
        self._pid = -1

    @staticmethod
    def claims(path: str) -> bool:
        return is_shards(path)

    @classmethod
    def open(cls, spec) -> "ShardSource":
        if spec.data.exclude:
            raise DatasetError(f"data.exclude applies to folders and list files; {spec.key} names "
                               f"shards, which the converter wrote without the bad files (convert "
                               f"--to wds --exclude FILE)")
        return cls(open_shards(spec.path, spec.key, None if spec.train else spec.classes), spec)

    def __getstate__(self):  # open streams and handles stay in the process that opened them
        return {k: v for k, v in self.__dict__.items() if k not in ("_streams", "_handles")} | {"_pid": -1}

    def _own(self) -> None:
        """This process's streams and handles (a forked child starts with none of its own)."""
        if self._pid != os.getpid():
            self._pid, self._streams, self._handles = os.getpid(), {}, {}

    def position(self, sid: int) -> tuple[int, int]:
        """Sample id -> (shard, sample in shard)."""
        shard = int(np.searchsorted(self.order.starts, sid, side="right")) - 1
        return shard, sid - int(self.order.starts[shard])

    def name(self, sid: int) -> str:
        """"train-000003.tar:key" as every path names a sample it read; without random access
        "train-000003.tar:#17", its position (the key is known only once read)."""
        if self.random_access:
            return self.read(sid).name
        shard, member = self.position(sid)
        return f"{shard_name(self.shards.urls[shard])}:#{member}"

    def read_batch(self, epoch: int, g: int) -> list[Raw]:
        """Batches g, g+K, g+2K, ... of stream g % K asked in that order by one process read
        each shard once, sequentially (`pipe:` too); any other request rebuilds the stream at
        that batch (exact; it re-reads up to one shuffle buffer)."""
        if not 0 <= g < len(self.order):
            raise IndexError(f"batch {g} outside 0..{len(self.order) - 1}")
        self._own()
        j, i = g % self.order.streams, g // self.order.streams
        s = self._streams.get((epoch, j))
        if s is None or s.next_i != i:
            for k in [k for k in self._streams if k[0] != epoch or k[1] == j]:
                self._streams.pop(k).samples.close()  # another epoch / a seek: drop it
            s = self._streams[(epoch, j)] = _Stream(self, epoch, j, i)
        out = s.take(g)
        if s.next_i * self.order.streams + j >= len(self.order):
            self._streams.pop((epoch, j)).samples.close()  # the stream's last batch: close it
        return out

    def read(self, sid: int) -> Raw:
        """Sample `sid` by one seek into a handle kept open per shard (the 16 most recent)."""
        if not self.random_access:
            raise DatasetError(f"{self.key}: random access needs local shards with offsets in "
                               f"their index; stream them with read_batch instead")
        self._own()
        s, m = self.position(int(sid))
        f = self._handles.pop(s, None)
        if f is None:
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles))).close()
            f = _open(self.shards.urls[s])
        self._handles[s] = f  # most recent last
        raw, = iter_shard(self.shards.urls[s], m, m + 1, sid0=int(self.order.starts[s]),
                          offsets=self.shards.offsets[s], num_classes=len(self.classes),
                          key=self.key, fileobj=f)
        return raw

    def _stream(self, epoch: int, t0: int, t1: int) -> Iterator[Raw]:
        for shard, first, end in self.order.runs(epoch, t0, t1):
            yield from iter_shard(self.shards.urls[shard], first, end,
                                  sid0=int(self.order.starts[shard]),
                                  offsets=self.shards.offsets[shard],
                                  num_classes=len(self.classes), key=self.key)
