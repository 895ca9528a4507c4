"""kernels/resized_crop.py: the torch reference against torchvision.transforms.v2, and the
Triton kernel (interpreted on CPU, compiled on CUDA) against the reference."""
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fastcls.kernels.resized_crop import (
    build_params,
    pack_images,
    resized_crop_normalize,
    resized_crop_normalize_reference,
    rrc_box,
)

from conftest import PY, ROOT, run_env
from helpers.kernel_cases import (
    ANTIALIAS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RRC_CASES,
    VAL_CASES,
    make_image,
    rrc_batch,
    val_batch,
)

HERE = Path(__file__).resolve().parent
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
# Reference vs torchvision on float input: same filter, float32 sums in another order.
# Stated tolerance: 2e-3 in 0..255 units (observed <= 5e-4; a half-pixel shift gives ~30).
TOL_255 = 2e-3


def poisoned(n, out_hw, dtype=torch.float32):
    return torch.full((n, 3, *out_hw), float("nan"), dtype=dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("name", list(RRC_CASES))
def test_reference_matches_torchvision_resized_crop(name, antialias):
    src, geom, box, flip, out_hw, (img,) = rrc_batch([name])
    out = resized_crop_normalize_reference(src, geom, box, torch.zeros(1, dtype=torch.uint8), out_hw,
                                           ZERO, ONE, antialias_above=1.0 if antialias else math.inf,
                                           out=poisoned(1, out_hw))
    ref = TF.resized_crop(img.float(), *RRC_CASES[name][1], list(out_hw), antialias=antialias)
    torch.testing.assert_close(out[0], ref, rtol=0, atol=TOL_255)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("name", list(VAL_CASES))
def test_reference_matches_torchvision_resize_center_crop(name, antialias):
    src, geom, box, flip, out_hw, (img,) = val_batch([name])
    _, resize, size = VAL_CASES[name]
    out = resized_crop_normalize_reference(src, geom, box, flip, out_hw, ZERO, ONE,
                                           antialias_above=1.0 if antialias else math.inf)
    ref = v2.Compose([v2.Resize(resize, antialias=antialias), v2.CenterCrop(size)])(img.float())
    torch.testing.assert_close(out[0], ref, rtol=0, atol=TOL_255)


def test_reference_uint8_torchvision_within_one_level():
    """torchvision's uint8 path rounds fixed-point sums: ours (float) is within 1 level."""
    img = make_image(90, 120, 0, smooth=True)
    src, geom, _ = pack_images([img])
    b, w = rrc_box(10, 7, 61, 100, (32, 32))
    geom, box = build_params(geom, [b], [w])
    out = resized_crop_normalize_reference(src, geom, box, torch.zeros(1, dtype=torch.uint8), (32, 32), ZERO, ONE)
    ref = TF.resized_crop(img, 10, 7, 61, 100, [32, 32], antialias=True).float()
    assert (out[0] - ref).abs().max() <= 1.0


def test_flip_normalize_dtype_layout():
    names = ["odd_sizes", "one_pixel_crop", "whole_image_flip"]
    src, geom, box, flip, out_hw, _ = rrc_batch(names)
    plain = resized_crop_normalize_reference(src, geom, box, torch.zeros(3, dtype=torch.uint8), out_hw, ZERO, ONE)
    norm = resized_crop_normalize_reference(src, geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD,
                                            torch.bfloat16)
    assert norm.dtype == torch.bfloat16 and norm.is_contiguous(memory_format=torch.channels_last)
    expect = plain.clone()
    expect[flip.bool()] = expect[flip.bool()].flip(-1)
    expect = (expect - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(norm.float(), expect.to(torch.bfloat16).float(), rtol=8e-3, atol=8e-3)
    hwc = resized_crop_normalize_reference(*rrc_batch(names, layout="HWC")[:5], ZERO, ONE)
    torch.testing.assert_close(hwc, plain.where(~flip.bool().view(3, 1, 1, 1), plain.flip(-1)))


def test_pack_records_strides_of_hwc_views_and_padded_rows():
    """nvImageCodec hands HWC memory seen as 3×H×W (no copy) and may pad rows: packing must
    address the same pixels as a plain CHW batch."""
    names = ["odd_sizes", "one_pixel_crop", "whole_image_flip"]
    src, geom, box, flip, out_hw, images = rrc_batch(names)
    plain = resized_crop_normalize_reference(src, geom, box, flip, out_hw, ZERO, ONE)
    views = [images[0].permute(1, 2, 0).contiguous().permute(2, 0, 1),          # HWC memory
             torch.zeros(images[1].shape[1], images[1].shape[2] + 5, 3, dtype=torch.uint8)[:, :-5]
             .copy_(images[1].permute(1, 2, 0)).permute(2, 0, 1),               # padded rows
             images[2]]
    src2, geom2, _ = pack_images(views)
    assert geom2[0, 1:4].tolist() == [1, 3 * images[0].shape[2], 3]
    geom2[:, 4:] = geom[:, 4:]
    got = resized_crop_normalize_reference(src2, geom2, box, flip, out_hw, ZERO, ONE)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)


def test_dispatch_on_cpu_is_the_reference():
    src, geom, box, flip, out_hw, _ = rrc_batch(list(RRC_CASES)[:3])
    a = resized_crop_normalize(src, geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD)
    b = resized_crop_normalize_reference(src, geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_arguments_raise():
    src, geom, box, flip, out_hw, _ = rrc_batch(["odd_sizes"])
    with pytest.raises(ValueError, match="src must be a 1-D uint8"):
        resized_crop_normalize(src.float(), geom, box, flip, out_hw, ZERO, ONE)
    with pytest.raises(ValueError, match="box must be float32"):
        resized_crop_normalize(src, geom, box.double(), flip, out_hw, ZERO, ONE)
    with pytest.raises(ValueError, match="out must be"):
        resized_crop_normalize(src, geom, box, flip, out_hw, ZERO, ONE, out=torch.empty(1, 3, *out_hw))
    with pytest.raises(ValueError, match="expected 3 channels"):
        pack_images([torch.zeros(4, 5, 6, dtype=torch.uint8)])


@pytest.mark.timeout(300)
def test_triton_interpreter_matches_reference():
    """Every irregular case, alone and mixed in one launch, fp32/bf16/fp16, all antialias
    modes, NaN-poisoned output (see helpers/kernels_interp_check.py)."""
    pytest.importorskip("triton")  # shipped with torch's Linux wheels
    env = run_env()
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env["PYTHONPATH"]
    r = subprocess.run([PY, str(HERE / "helpers" / "kernels_interp_check.py")], env=env, capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "0 failures" in r.stdout and r.stdout.count("ok  ") >= 25


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_reference(dtype):
    rrc16 = [n for n, c in RRC_CASES.items() if c[2] == (16, 16)]
    val17 = [n for n, c in VAL_CASES.items() if c[2] == 17]
    for batch in (rrc_batch(rrc16), val_batch(val17)):
        src, geom, box, flip, out_hw, _ = batch
        for aa in ANTIALIAS.values():
            ref = resized_crop_normalize_reference(src, geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD,
                                                   torch.float32, aa)
            out = poisoned(geom.shape[0], out_hw, dtype).cuda()
            got = resized_crop_normalize(src.cuda(), geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD,
                                         dtype, aa, out=out)
            tol = dict(rtol=0, atol=2e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
            torch.testing.assert_close(got.float().cpu(), ref.to(dtype).float(), **tol)


def test_kernel_benchmark_smoke(tmp_path):
    import json
    out = tmp_path / "k.json"
    r = subprocess.run([PY, "benchmarks/kernels.py", "--device", "cpu", "--batch", "3", "--size", "16",
                        "--min-side", "20", "--max-side", "40", "--warmup", "1", "--steps", "1", "--repeats", "2",
                        "--out", str(out)], cwd=HERE.parent, env=run_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [row["impl"] for row in res["results"]] == ["fused torch reference", "per-image torch loop"]
    assert all(row["img_per_s"] > 0 and len(row["runs"]) == 2 for row in res["results"])
    assert res["mean_abs_diff_vs_loop_255"] < 1.0  # same crops, same filter, uint8 rounding only


def test_kernels_import_from_a_checkout_without_install(tmp_path):
    """PYTHONPATH=checkout with no install (the lent GPU machines run device_check.sh so):
    `fastcls.kernels` is still the checkout's kernels/ folder (the symlink fastcls/kernels)."""
    code = ("import os, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path\n"   # drop an editable install's mapping
            "                    if '__editable__' not in getattr(f, '__module__', '')]\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import fastcls.kernels.resized_crop as r\n"
            "print(os.path.realpath(r.__file__))\n")
    out = subprocess.run([PY, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(ROOT / "kernels" / "resized_crop.py")


def test_kernels_import_from_a_fresh_clone(tmp_path):
    """The committed tree, cloned (as CI and the GPU machines get it), imports
    `fastcls.kernels` from PYTHONPATH=clone with no install and no import hook: the package
    is a plain folder (the committed symlink), visible to static tools."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert (clone / "fastcls" / "kernels").is_symlink()
    code = ("import os, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if '__editable__' not in getattr(f, '__module__', '')]\n"
            "n = len(sys.meta_path)\n"
            "import fastcls.kernels.resized_crop as r\n"
            "assert len(sys.meta_path) == n, 'fastcls added an import hook'\n"
            "print(os.path.realpath(r.__file__))\n")
    env = dict(os.environ, PYTHONPATH=str(clone))
    out = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str((clone / "kernels" / "resized_crop.py").resolve())


# ---------------------------------------------------------------- ahead-of-time GPU compile (no GPU)

_OUT_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _ptxas_report(cc: int, dtype: torch.dtype) -> str:
    """Compile the crop kernel for sm_<cc> ahead of time (Triton's own ptxas; no GPU, no
    driver) and return ptxas's resource report for it."""
    import re
    import tempfile
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcls.kernels.resized_crop import _resized_crop_kernel
    sig = {"src": "*u8", "geom": "*i64", "box": "*fp32", "flip": "*u8", "out": _OUT_TYPES[dtype],
           "H_OUT": "i32", "W_OUT": "i32", "antialias_above": "fp32", "m0": "fp32", "m1": "fp32",
           "m2": "fp32", "r0": "fp32", "r1": "fp32", "r2": "fp32", "BLOCK": "constexpr"}
    k = triton.compile(ASTSource(fn=_resized_crop_kernel, signature=sig, constexprs={"BLOCK": 256}),
                       target=GPUTarget("cuda", cc, 32))
    ptx = k.asm["ptx"]
    assert re.search(rf"\.target sm_{cc}", ptx), "compiled for another target"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        r = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.parametrize("dtype", list(_OUT_TYPES), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
def test_kernel_compiles_ahead_of_time_without_spills(cc, dtype):
    """The Triton kernel compiles for A100 (sm80) and H100/H200 (sm90) and each output dtype,
    here without a GPU; spilled registers would go to local memory in the inner loops.
    `pytest -k sm90` selects the H100/H200 ones."""
    import re
    report = _ptxas_report(cc, dtype)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and spills.groups() == ("0", "0"), report
    assert 0 < regs <= 255, report  # the per-thread hardware limit
    print(f"sm{cc} {dtype}: {regs} registers, no spills")


def test_the_kernel_reads_decoded_images_in_place_only_on_cuda():
    """The decision the batched loader takes per device (the interpreter check above shows
    pack_in_place gives pack_images' output bitwise); bad input is refused."""
    from fastcls.kernels.resized_crop import pack_in_place, reads_in_place, triton
    assert reads_in_place(torch.device("cuda", 0)) == (triton is not None)
    assert not reads_in_place(torch.device("cpu"))
    with pytest.raises(ValueError, match="CHW or HWC memory"):
        pack_in_place([torch.zeros(3, 8, 16, dtype=torch.uint8)[:, :, ::2]])
    a, b = torch.zeros(3, 4, 5, dtype=torch.uint8), torch.zeros(6, 7, 3, dtype=torch.uint8).permute(2, 0, 1)
    src, geom, sizes = pack_in_place([a, b])
    low = min(a.data_ptr(), b.data_ptr())
    assert src.data_ptr() == low and geom[:, 0].tolist() == [a.data_ptr() - low, b.data_ptr() - low]
    assert geom[:, 1:4].tolist() == [[20, 5, 1], [1, 21, 3]] and sizes == [(4, 5), (6, 7)]
