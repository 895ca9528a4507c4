"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: the Triton kernel
(on CPU, interpreted) against the torch reference, on every irregular case, each batch
alone and all mixed in one launch, with a NaN-poisoned output buffer so an unwritten pixel
fails. Prints one line per check; exit status 1 on any mismatch."""
import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
from kernel_cases import ANTIALIAS, IMAGENET_MEAN, IMAGENET_STD, RRC_CASES, VAL_CASES, rrc_batch, val_batch  # noqa: E402

from fastcls.kernels.resized_crop import resized_crop_normalize_reference, resized_crop_normalize_triton  # noqa: E402

failures = 0


def check(label, batch, dtype=torch.float32, antialias="auto", block=64):
    global failures
    src, geom, box, flip, out_hw, _ = batch
    above = ANTIALIAS[antialias]
    ref = resized_crop_normalize_reference(src, geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD,
                                           torch.float32, above)
    out = torch.full((geom.shape[0], 3, *out_hw), float("nan"), dtype=dtype).to(memory_format=torch.channels_last)
    got = resized_crop_normalize_triton(src, geom, box, flip, out_hw, IMAGENET_MEAN, IMAGENET_STD, dtype,
                                        above, out=out, block=block)
    assert got is out
    unwritten = int(torch.isnan(got.float()).sum())
    # fp32: float32 accumulation order differs from the reference's matmuls (~1e-5 of 2.6);
    # bf16: one rounding of the result (8 mantissa bits).
    tol = dict(rtol=0, atol=2e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    err = (got.float() - ref.to(dtype).float()).abs().nan_to_num(math.inf).max().item()
    ok = unwritten == 0 and torch.allclose(got.float(), ref.to(dtype).float(), **tol)
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {label} {dtype} antialias={antialias}: max err {err:.2e}, "
          f"unwritten {unwritten}")


sizes = {}
for name, (_, _, out_hw, _) in RRC_CASES.items():
    sizes.setdefault(out_hw, []).append(name)
for name in RRC_CASES:  # batch of 1, each case alone
    check(f"rrc[{name}]", rrc_batch([name]), antialias="on")
for out_hw, names in sizes.items():  # mixed sizes in one launch, every antialias mode
    for aa in ANTIALIAS:
        check(f"rrc mixed{names}", rrc_batch(names), antialias=aa)
check("rrc mixed HWC layout", rrc_batch(sizes[(13, 17)], layout="HWC"))
check("rrc mixed bf16", rrc_batch(sizes[(16, 16)]), dtype=torch.bfloat16)
check("rrc mixed fp16 block 128", rrc_batch(sizes[(16, 16)]), dtype=torch.float16, block=128)
vsizes = {}
for name, (_, _, size) in VAL_CASES.items():
    vsizes.setdefault(size, []).append(name)
for size, names in vsizes.items():
    for aa in ANTIALIAS:
        check(f"val mixed{names}", val_batch(names), antialias=aa)
# Images read where they are (pack_in_place, what the batched loader does on CUDA): the same
# kernel on separate CHW tensors and HWC views (nvImageCodec's layout) gives bitwise the
# output of the packed copy.
from fastcls.kernels.resized_crop import build_params, pack_images, pack_in_place, rrc_box  # noqa: E402

g = torch.Generator().manual_seed(5)
apart = []
for i, (h, w) in enumerate([(37, 51), (64, 23), (18, 90), (41, 41)]):
    img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
    apart.append(img.permute(2, 0, 1) if i % 2 else img.permute(2, 0, 1).contiguous())
crops = [rrc_box(2, 3, h - 5, w - 7, (16, 16)) for h, w in ((37, 51), (64, 23), (18, 90), (41, 41))]
flip = torch.tensor([0, 1, 0, 1], dtype=torch.uint8)
outs = []
for pack in (pack_images, pack_in_place):
    src, geom0, _ = pack(apart)
    geom, box = build_params(geom0, [c[0] for c in crops], [c[1] for c in crops])
    outs.append(resized_crop_normalize_triton(src, geom, box, flip, (16, 16), IMAGENET_MEAN, IMAGENET_STD,
                                              torch.float32, 1.0, block=64))
same = torch.equal(outs[0], outs[1])
failures += not same
print(f"{'ok  ' if same else 'FAIL'} pack_in_place equals pack_images bitwise (4 images, CHW and HWC views)")
print(f"{failures} failures")
sys.exit(1 if failures else 0)
