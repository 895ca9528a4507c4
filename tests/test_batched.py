"""The native backend's batched path (data.native_decode=batched): byte-reading workers,
one batched decode, one fused crop/resize/normalize kernel; end to end through
build_loader on CPU (torch reference kernel), on CUDA with nvJPEG + Triton (gpu tests)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from fastcls.config import ConfigError
from fastcls.data import DatasetError, build_loader
from fastcls.data.base import MEAN, STD
from fastcls.data.batched import BatchedLoader
from fastcls.data.workers import WorkersLoader
from fastcls.train import main

from conftest import CPU, bad_folder, loader_cfg, make_folder, write_image

try:
    import nvidia.nvimgcodec  # noqa: F401
    HAVE_NV = True
except ImportError:
    HAVE_NV = False
# Both batch decoders are tested on CPU; CI installs nvImageCodec through the test extra.
DECODER = pytest.mark.parametrize("decoder", [
    "torchvision", pytest.param("nvimgcodec", marks=pytest.mark.skipif(not HAVE_NV, reason="pip install 'fastcls[nvimgcodec]'"))])
M = torch.tensor(MEAN).view(3, 1, 1)
S = torch.tensor(STD).view(3, 1, 1)


def make_cfg(train, val="", **data):
    return loader_cfg(train, val, **{"native_decode": "batched", **data})


def smooth_folder(root, n=6, fmt="PNG"):
    """Smooth gradients (interpolation differences stay small), 2 classes."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(n):
            w, h = int(rng.integers(40, 130)), int(rng.integers(40, 130))
            yy, xx = np.mgrid[0:h, 0:w]
            phase = rng.uniform(0, 6)
            arr = np.stack([127 + 120 * np.sin(xx / w * 3 + phase), 127 + 120 * np.cos(yy / h * 2 + phase),
                            (xx + yy) * 255 / (w + h)], -1).astype(np.uint8)
            p = root / c / f"{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return root


# ---------------------------------------------------------------- selection

def test_native_decode_knob_selects_the_path(folder):
    assert isinstance(build_loader(make_cfg(folder, native_decode="auto"), "train", CPU), WorkersLoader)
    assert isinstance(build_loader(make_cfg(folder, native_decode="workers"), "train", CPU), WorkersLoader)
    assert isinstance(build_loader(make_cfg(folder), "train", CPU), BatchedLoader)
    with pytest.raises(ConfigError, match="data.native_decode: unknown name 'gpu'; valid choices: auto, workers, batched"):
        make_cfg(folder, native_decode="gpu")
    with pytest.raises(ConfigError, match="data.antialias"):
        make_cfg(folder, antialias="yes")
    with pytest.raises(ConfigError, match="data.decoder: unknown name 'nvjpeg'"):
        make_cfg(folder, decoder="nvjpeg")
    auto = build_loader(make_cfg(folder), "train", CPU)
    assert auto.decoder == ("nvimgcodec" if HAVE_NV else "torchvision")


def test_cmyk_jpegs_skip_the_batch_decode_call(tmp_path):
    """A CMYK JPEG fails torchvision's whole batched CUDA decode_jpeg call (then all 256 are
    redone one by one): the workers mark it (sample.jpeg_needs_cpu, from the frame header)
    and it is decoded on the CPU, outside the batch call, which stays whole."""
    import collections
    import io

    from fastcls.data.batched import decode_batch
    from fastcls.data.sample import jpeg_needs_cpu
    rng = np.random.default_rng(0)
    files = {}
    for mode, kw in (("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).convert(mode).save(
            buf, format="JPEG", quality=90, **kw)
        files[mode + ("-progressive" if kw else "")] = buf.getvalue()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert {k: jpeg_needs_cpu(v) for k, v in files.items()} == {
        "RGB": False, "L": False, "CMYK": True, "RGB-progressive": False}
    assert not jpeg_needs_cpu(png.getvalue()) and not jpeg_needs_cpu(b"") and not jpeg_needs_cpu(b"\xff\xd8\xff")
    assert jpeg_needs_cpu(np.frombuffer(files["CMYK"], np.uint8))  # a worker's numpy view too
    datas = [torch.frombuffer(bytearray(v), dtype=torch.uint8) for v in files.values()]
    fallbacks = collections.Counter()
    images, errors = decode_batch(datas, CPU, None, fallbacks, [jpeg_needs_cpu(v) for v in files.values()])
    assert errors == [None] * 4 and all(im.shape == (3, 24, 30) for im in images)
    assert fallbacks["CMYK or other JPEG nvJPEG refuses (decoded on the CPU)"] == 1
    assert fallbacks["the batch decode_jpeg call failed"] == 0


@pytest.mark.skipif(not HAVE_NV, reason="pip install 'fastcls[nvimgcodec]'")
def test_nvimgcodec_one_output_per_input(tmp_path):
    """An nvImageCodec that drops a failed image from its output list (releases before 0.9)
    would shift every later label: a DatasetError instead. The CPU-only decoder here; the
    check is the same on CUDA."""
    from fastcls.data.batched import NvImageCodecDecoder, one_output_per_input
    root = make_folder(tmp_path / "d", classes=("a",), per_class=(3,))
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted((root / "a").iterdir())]
    dec = NvImageCodecDecoder(CPU)
    assert len(dec(datas)) == 3 and all(im is not None for im in dec(datas))
    real = dec.decoder

    class Dropping:  # what an old release did with a failed image
        def decode(self, items, **kw):
            return real.decode(items, **kw)[:-1]

    dec.decoder = Dropping()
    with pytest.raises(DatasetError, match="returned 2 images for 3 inputs"):
        dec(datas)
    one_output_per_input([None, None], 2)  # None entries are failures, counted, not a shift


@pytest.mark.skipif(HAVE_NV, reason="checks the message when nvImageCodec is missing")
def test_nvimgcodec_missing_says_how_to_install(folder):
    with pytest.raises(DatasetError, match=r"nvImageCodec is not installed; run: pip install 'fastcls\[nvimgcodec\]'"):
        build_loader(make_cfg(folder, decoder="nvimgcodec"), "train", CPU)


@DECODER
def test_val_matches_torchvision_resize_center_crop(tmp_path, decoder):
    root = smooth_folder(tmp_path / "v", fmt="JPEG")
    val = build_loader(make_cfg(root, root, antialias="on", batch_size=5, decoder=decoder), "val", CPU,
                       classes=["a", "b"])
    assert val.decoder == decoder
    x = torch.cat([b for b, _ in val])
    tf = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])
    for i, (path, _) in enumerate(val.source.table.pairs()):
        img = decode_jpeg(torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8),
                          mode=ImageReadMode.RGB)
        ref = (tf(img.float()) - M) / S
        # same decoder, same filter: float32 summation order only (stated: 1e-4 normalized)
        torch.testing.assert_close(x[i], ref, rtol=0, atol=1e-4)


def test_antialias_modes_differ_only_when_downscaling(tmp_path):
    root = smooth_folder(tmp_path / "d", n=2)
    xs = {aa: torch.cat([b for b, _ in build_loader(make_cfg(root, root, antialias=aa, image_size=8,
                                                             val_resize=8), "val", CPU, classes=["a", "b"])])
          for aa in ("on", "off", "auto")}
    assert not torch.allclose(xs["on"], xs["off"])  # 40-130 px -> 8 px: > 2x down everywhere
    torch.testing.assert_close(xs["auto"], xs["on"])


# ---------------------------------------------------------------- odd and bad files

@DECODER
def test_grayscale_cmyk_png_tiny_decode_as_rgb(tmp_path, decoder):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "a" / "gray.jpg", rng, mode="L")
    smooth_folder(tmp_path.parent / (tmp_path.name + "_s"), n=1, fmt="PNG")
    smooth = tmp_path.parent / (tmp_path.name + "_s") / "a" / "00.png"
    Image.open(smooth).convert("CMYK").save(tmp_path / "a" / "cmyk.jpg", quality=95)
    write_image(tmp_path / "a" / "png_named.jpg", rng, fmt="PNG")
    write_image(tmp_path / "a" / "tiny.jpg", rng, size=(1, 1))
    write_image(tmp_path / "a" / "z.bmp", rng, fmt="BMP")
    cfg = make_cfg(tmp_path, tmp_path, batch_size=5, antialias="on", decoder=decoder)
    val = build_loader(cfg, "val", CPU, classes=["a"])
    (x, y), = list(val)
    assert x.shape == (5, 3, 32, 32) and val.bad_files == []
    gray = x[1] * S + M  # sorted: cmyk, gray, png_named, tiny, z
    torch.testing.assert_close(gray[0], gray[1], atol=1e-3, rtol=0)
    pil = v2.functional.pil_to_tensor(Image.open(tmp_path / "a" / "cmyk.jpg").convert("RGB")).float()
    ref = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])(pil)
    assert ((x[0] * S + M) - ref).abs().mean() < 1.0  # CMYK->RGB like PIL (inverted: ~100)
    train = build_loader(cfg, "train", CPU)
    assert [tuple(b.shape) for b, _ in train] == [(5, 3, 32, 32)] and train.bad_files == []


def test_truncation_check_keeps_valid_jpegs(tmp_path):
    """Truncated JPEGs are caught before decode (GPU decoders may not refuse them); valid
    baseline/progressive JPEGs, with or without bytes after the end marker, pass."""
    from fastcls.data.sample import jpeg_truncated
    arr = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for progressive in (False, True):
        Image.fromarray(arr).save(tmp_path / "x.jpg", quality=90, progressive=progressive)
        raw = (tmp_path / "x.jpg").read_bytes()
        assert not jpeg_truncated(raw) and not jpeg_truncated(raw + b"\0" * 64)
        assert jpeg_truncated(raw[: len(raw) * 2 // 3]) and jpeg_truncated(raw[:-2])
    assert not jpeg_truncated(b"\x89PNG....")
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "a" / "trailing.jpg").write_bytes(raw + b"\0" * 64)
    (root / "a" / "cut.jpg").write_bytes(raw[:-2])
    val = build_loader(make_cfg(root, root, max_bad_fraction=0.5), "val", CPU, classes=["a"])
    assert sum(y.shape[0] for _, y in val) == 1 and "cut.jpg: truncated JPEG" in val.bad_files[0]


# ---------------------------------------------------------------- training

def test_trainer_runs_on_batched_path(tmp_path):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "r"
    rc = main(["pipelines/demo.yaml", f"data.train={data}", f"data.val={data}", "data.demo=false",
               "model.num_classes=3", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
               "data.workers=0", "data.native_decode=batched", "train.progress=false", f"train.out_dir={out}",
               "train.epochs=1", "train.amp=off"])
    assert rc == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_images"] == 18 and math.isfinite(row["train_loss"])


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@DECODER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_batched_matches_cpu_batched(tmp_path, dtype, decoder):
    """nvJPEG + Triton kernel on CUDA vs libjpeg + torch reference on CPU, same boxes."""
    root = smooth_folder(tmp_path / "d", fmt="JPEG")
    dev = torch.device("cuda")
    gpu = build_loader(make_cfg(root, root, batch_size=4, workers=2, decoder=decoder), "train", dev, dtype=dtype)
    cpu = build_loader(make_cfg(root, root, batch_size=4, workers=2, decoder="torchvision"), "train", CPU)
    for (x, y), (xc, yc) in zip(gpu, cpu, strict=True):
        assert x.device.type == "cuda" and x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), yc)
        # nvJPEG's IDCT/upsampling differs from libjpeg-turbo's by a level or two
        assert ((x.float().cpu() - xc) * S).abs().mean() < 2.0
    val = build_loader(make_cfg(root, root, batch_size=4, decoder=decoder), "val", dev, classes=gpu.classes)
    assert sum(y.shape[0] for _, y in val) == 12


@pytest.mark.gpu
@DECODER
def test_cuda_bad_and_odd_files(tmp_path, decoder):
    root = bad_folder(tmp_path)
    rng = np.random.default_rng(0)
    write_image(root / "a" / "gray.jpg", rng, mode="L")
    write_image(root / "a" / "cmyk.jpg", rng, mode="CMYK")
    write_image(root / "a" / "png_named.jpg", rng, fmt="PNG")
    dev = torch.device("cuda")
    val = build_loader(make_cfg(root, root, max_bad_fraction=0.5, decoder=decoder), "val", dev, classes=["a", "b"])
    assert sum(y.shape[0] for _, y in val) == 23 and len(val.bad_files) == 3


# ---------------------------------------------------------------- one buffer per batch, staging thread

FD_SCRIPT = r"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
import torch
from fastcls.config import config_from_dict
from fastcls.data.base import LoaderSpec
from fastcls.data.batched import BatchedLoader
from fastcls.data.folder import FolderIndex, FolderSource, Table, scan_folder
root = sys.argv[1]
idx = scan_folder(root)
rels = [os.path.relpath(p, idx.root) for p, _ in idx.table.pairs()]
labels = idx.table.labels.tolist()
idx = FolderIndex(idx.root, idx.classes, Table(idx.root, rels * 40, labels * 40), [])  # 2,560 samples
data = config_from_dict({"model": {"name": "resnet_tiny"}, "data": {
    "batch_size": 256, "image_size": 8, "workers": 2, "native_decode": "batched",
    "decoder": "torchvision"}}).data
spec = LoaderSpec(split="train", path=root, data=data, batch_size=256, device=torch.device("cpu"),
                  dtype=torch.float32, rank=0, world_size=1, seed=0, num_classes=1)
loader = BatchedLoader(FolderSource(idx, spec), spec)
loader.set_epoch(0)
n = 0
for batch in loader.loader:  # the workers' batches as they cross to this process
    if n == 0:
        x, y = loader._finish(loader._decode(batch))  # and the first one decoded + cropped
        assert x.shape == (256, 3, 8, 8)
    n += 1
print("batches", n, "of", len(loader))
del loader, batch
import gc; gc.collect()  # shut the workers down now, not at exit (they outlive SIGTERM by 30 s)
"""


def test_batches_cross_from_workers_in_one_buffer_under_ulimit_1024(tmp_path):
    """Batch 256, 2 workers, 10 batches under RLIMIT_NOFILE 1024: a tensor per image (each
    through its own file descriptor) failed here with 'Too many open files'."""
    import subprocess

    from conftest import PY, run_env
    rng = np.random.default_rng(0)
    for i in range(64):
        write_image(tmp_path / "d" / "a" / f"{i:02d}.jpg", rng, size=(24, 20))
    proc = subprocess.run([PY, "-c", FD_SCRIPT, str(tmp_path / "d")], env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches 10 of 10" in proc.stdout


def test_staging_thread_runs_ahead_of_a_slow_consumer():
    import time

    from fastcls.data.base import staged
    staged_at = []

    def stage(i):
        staged_at.append(i)
        return torch.full((1,), float(i)), torch.zeros(1)

    seen = []
    for x, _ in staged(iter(range(6)), stage, CPU, depth=2):
        time.sleep(0.2)  # the consumer (the training step) is slower than staging
        seen.append((int(x), max(staged_at)))
    assert [s for s, _ in seen] == list(range(6))  # in order, each once
    assert all(ahead >= min(i + 2, 5) for i, ahead in seen)  # two batches ready ahead


def _stage_threads():
    import threading
    return [t for t in threading.enumerate() if t.name == "fastcls-stage"]


def test_staging_thread_raises_in_order_and_stops():
    from fastcls.data.base import staged

    def stage(i):
        if i == 3:
            raise DatasetError("bad batch 3")
        return torch.zeros(1), torch.zeros(1)

    got = []
    with pytest.raises(DatasetError, match="bad batch 3"):
        for x, _ in staged(iter(range(10)), stage, CPU):
            got.append(x)
    assert len(got) == 3 and _stage_threads() == []


def test_staging_thread_stops_on_early_exit():
    """A preemption break (or a consumer error) closes the generator: the thread stops after
    its batch in hand, is joined, and the source is not drained."""
    from fastcls.data.base import staged
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i

    gen = staged(source(), lambda i: (torch.zeros(1), torch.zeros(1)), CPU, depth=2)
    next(gen)
    next(gen)
    gen.close()
    assert _stage_threads() == [] and len(pulled) <= 2 + 2 + 2  # taken, queued, in hand


def test_refused_and_resized_images_take_the_per_image_path(tmp_path, monkeypatch):
    """The batch decoder refuses image 1 and decodes image 2 one row short of its header's
    size (both rare): training replaces both (full batches, every replacement counted and
    named), evaluation drops the refused one and keeps the other with the box of its
    decoded size, i.e. torchvision's Resize + CenterCrop of what was decoded."""
    from fastcls.data import batched
    from fastcls.kernels.resized_crop import resize_center_crop_box
    root = make_folder(tmp_path / "d")
    real = batched.decode_batch
    shapes = []

    def flaky(datas, device, *a):
        images, errors = real(datas, device, *a)
        if len(images) > 2:
            images[1], errors[1] = None, "refused by the test"
            images[2] = images[2][:, :-1, :]
            shapes.append(tuple(images[2].shape[1:]))
        return images, errors

    monkeypatch.setattr(batched, "decode_batch", flaky)
    train = build_loader(make_cfg(root, batch_size=4, max_bad_fraction=1.0), "train", CPU)
    train.set_epoch(0)
    n = 0
    for x, y in train:
        assert x.shape == (4, 3, 32, 32) and len(y) == 4 and torch.isfinite(x).all()
        n += 1
    assert n == len(train) and sum("refused by the test" in b for b in train.bad_files) == n
    assert sum("header says" in b for b in train.bad_files) == n
    val = build_loader(make_cfg(root, root, batch_size=6, max_bad_fraction=1.0), "val", CPU,
                       classes=train.classes)
    seen, pulled = 0, []
    import fastcls.kernels.resized_crop as rc
    real_kernel = rc.resized_crop_normalize

    def spy(src, geom, box, flip, out_hw, *a, **k):
        pulled.append(box.clone())
        return real_kernel(src, geom, box, flip, out_hw, *a, **k)

    monkeypatch.setattr(rc, "resized_crop_normalize", spy)
    shapes.clear()
    for x, _ in val:
        seen += len(x)
    assert seen == 18 - 3 and len(val.bad_files) == 3  # one refused per batch of 6, dropped
    for (h, w), box in zip(shapes, pulled):  # row 2 of each batch is now row 1 (row 1 dropped)
        ref, _ = resize_center_crop_box(h, w, 36, 32)
        np.testing.assert_allclose(box[1].numpy(), np.float32(ref), rtol=1e-6)
    train.close()
    val.close()


def test_worker_kernel_rows_equal_the_kernel_modules_boxes():
    """The rows the byte workers build (batched.kernel_rows) are the kernel module's own
    boxes: `rrc_box` of each drawn crop in training, `resize_center_crop_box` (torchvision's
    Resize + CenterCrop) of the image size in evaluation, at several output sizes."""
    from fastcls.data.batched import kernel_rows
    from fastcls.data.sample import Crop, sample_rng, train_crop
    from fastcls.kernels.resized_crop import resize_center_crop_box, rrc_box
    sizes = [(375, 500), (500, 333), (64, 64), (1, 1), (1200, 17)]
    crops = [train_crop(w, h, sample_rng(0, 0, i), (0.08, 1.0), (3 / 4, 4 / 3), 0.5)
             for i, (h, w) in enumerate(sizes)]
    for size in (32, 224):
        box, window, flip = kernel_rows(crops, True, 256, size)
        for c, b, win, f in zip(crops, box, window, flip):
            ref_box, ref_win = rrc_box(c.top, c.left, c.height, c.width, (size, size))
            np.testing.assert_allclose(b, np.float32(ref_box))
            assert tuple(win) == ref_win and f == c.flip
        val = [Crop(0, 0, h, w, False, h, w) for h, w in sizes]
        box, window, flip = kernel_rows(val, False, round(size * 256 / 224), size)
        for (h, w), b, win in zip(sizes, box, window):
            ref_box, ref_win = resize_center_crop_box(h, w, round(size * 256 / 224), size)
            np.testing.assert_allclose(b, np.float32(ref_box), rtol=1e-6)
            assert tuple(win) == tuple(ref_win) and not flip.any()


def test_decode_stage_runs_beside_the_stage_in_order_and_stops():
    """staged(decode=...): batch k + 1 is decoded while batch k is in `stage` (so a decoder's
    host wait is hidden): stage(k) waits for decode(k + 1) to have started, which a single
    thread could never do (it would time out). Order kept, a decode error raised in order,
    an early close joins both threads."""
    import threading

    from fastcls.data.base import staged
    started = {i: threading.Event() for i in range(8)}

    def decode(i):
        started[i].set()
        if i == 6:
            raise DatasetError("bad batch 6")
        return i * 10

    def stage(v):
        i = v // 10
        assert started[i + 1].wait(timeout=30), f"decode({i + 1}) did not run beside stage({i})"
        return torch.full((1,), float(v)), torch.zeros(1)

    got = []
    with pytest.raises(DatasetError, match="bad batch 6"):
        for x, _ in staged(iter(range(8)), stage, CPU, decode=decode):
            got.append(int(x))
    assert got == [0, 10, 20, 30, 40, 50]  # decode(6) started (stage(5) went on), then raised
    names = {"fastcls-stage", "fastcls-decode"}
    assert not [t for t in threading.enumerate() if t.name in names]
    gen = staged(iter(range(1000)), lambda v: (torch.zeros(1), torch.zeros(1)), CPU, decode=lambda i: i)
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name in names]


@pytest.mark.parametrize("decode", ["workers", "batched"])
def test_one_side_stream_per_loader(tmp_path, decode):
    """staged() runs every epoch and every evaluation on the loader's one side stream (a stream
    per call strands each epoch's CUDA memory pool): the loader's accessor is asked once per
    iteration and makes the stream once, which waits on the consumer's stream once. The CUDA
    factory is counted here, not called."""
    from fastcls.data.base import SideStream
    root = make_folder(tmp_path / "d")
    made = []

    class Spy(SideStream):
        asked = 0

        def __call__(self, after=None):
            Spy.asked += 1
            return super().__call__(after)

    loader = build_loader(make_cfg(root, native_decode=decode), "train", CPU)
    loader.side_stream = Spy(CPU, factory=lambda d: made.append(d) or object())
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len(list(loader)) == len(loader)
    assert Spy.asked == 3 and made == []  # asked each epoch; off CUDA nothing is created
    waits = []

    class Stream:  # stands in for torch.cuda.Stream
        def wait_stream(self, other):
            waits.append(other)

    side = SideStream(torch.device("cuda", 0), factory=lambda d: made.append(d) or Stream())
    assert len({id(side(after="consumer")) for _ in range(5)}) == 1 and made == [torch.device("cuda", 0)]
    # the new stream waited on the consumer's stream once (the Normalizer's constants were
    # made there), not per epoch
    assert waits == ["consumer"]


@DECODER
def test_batched_loader_early_exit_leaves_no_thread_or_worker(tmp_path, decoder):
    import multiprocessing
    others = set(multiprocessing.active_children())  # another test's, if any: not this loader's
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=(10, 10))
    loader = build_loader(make_cfg(root, workers=2, batch_size=2, decoder=decoder), "train", CPU)
    it = iter(loader)
    next(it)
    it.close()  # what the trainer's preemption break does to the epoch's iterator
    assert _stage_threads() == []
    x, _ = next(iter(loader))  # the persistent workers serve the next epoch
    assert x.shape == (2, 3, 32, 32)
    keep = [loader]  # held, as a stored traceback can hold a run's frames: only close() helps
    loader.close()
    assert set(multiprocessing.active_children()) <= others  # joined by close(), not left to gc
    assert len(list(keep[0])) == len(loader)  # iterating again starts the workers again
    loader.close()
    assert set(multiprocessing.active_children()) <= others


@DECODER
def test_decoder_fallbacks_are_counted_and_reported_once_per_epoch(tmp_path, decoder):
    """Files the batch decoder does not read (PNGs through decode_jpeg, a GIF-free zoo here)
    are decoded one by one and counted; the loader reports one line per epoch."""
    root = smooth_folder(tmp_path / "png", n=3, fmt="PNG")
    loader = build_loader(make_cfg(root, batch_size=2, decoder=decoder), "train", CPU)
    list(loader)
    lines = loader.epoch_warnings()
    if decoder == "torchvision":
        assert len(lines) == 1 and lines[0].startswith(f"{loader.num_images} of {loader.num_images} images")
        assert "not a JPEG" in lines[0]
    else:  # nvImageCodec reads PNG in its batch call
        assert lines == []
    jpgs = build_loader(make_cfg(make_folder(tmp_path / "j"), batch_size=2, decoder=decoder), "train", CPU)
    list(jpgs)
    assert jpgs.epoch_warnings() == []


def test_trainer_warns_about_decoder_fallbacks_once_per_epoch(tmp_path, capsys):
    root = smooth_folder(tmp_path / "png", n=4, fmt="PNG")
    rc = main(["pipelines/demo.yaml", f"data.train={root}", f"data.val={root}", "model.num_classes=2",
               "data.native_decode=batched", "data.decoder=torchvision", "data.batch_size=4",
               "data.image_size=32", "data.val_resize=32", "data.workers=0", "train.epochs=2",
               "train.progress=false", "train.amp=off", f"train.out_dir={tmp_path / 'run'}"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "batch call" in ln]
    assert len(lines) == 2 and "epoch 1: 8 of 8 images" in lines[0] and "epoch 2:" in lines[1]
