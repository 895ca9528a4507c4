"""Export a checkpoint's model for serving, verified against eager PyTorch.

    python -m fastcls.export runs/demo/best.pt --format onnx --out demo.onnx
    python -m fastcls.export runs/r50/best.pt --format exported-program --out r50.pt2 --ema
    python -m fastcls.export runs/r50/best.pt --format torchscript --out r50.ts data.image_size=288
    python -m fastcls.export resnet50-11ad3fa6.pth model.name=resnet50 --format onnx --out r50.onnx

Formats: `onnx` (torch.onnx.export's torch.export-based exporter, one self-contained file;
needs `pip install 'fastcls[onnx]'`: onnx, onnxruntime, onnxscript), `exported-program`
(torch.export.save: load with torch.export.load(PATH).module()) and `torchscript`
(torch.jit.trace; deprecated by PyTorch since 2.10, kept for older runtimes). The model is
exported in fp32, eval mode, with input `images` float32 N×3×S×S (NCHW, ImageNet-normalized;
S = data.image_size) and output `logits` N×classes; the batch size N is dynamic. Before the
file is written, the export is run on batches of 1 and 3 random images (its runtime:
onnxruntime, torch.export.load or torch.jit.load) and compared with eager PyTorch:
|export - eager| <= 1e-4 + 1e-3 x |eager| per logit, else nothing is written and the
command fails. PATH.json beside it holds what inference needs: input name/shape/layout, the
val transform (resize, crop, mean/std), the class names, and the verification result.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from .atomic import write_atomic, write_text_atomic
from .data.base import val_image_size
from .inference import (
    USER_ERRORS,
    InferenceError,
    build_inference_model,
    checkpoint_parser,
    is_override,
    load_checkpoint,
    preprocessing,
)

FORMATS = ("onnx", "torchscript", "exported-program")
ATOL, RTOL = 1e-4, 1e-3      # per logit: |export - eager| <= ATOL + RTOL * |eager|
SAMPLE_BATCH = 2             # traced/exported with this batch size ...
VERIFY_BATCHES = (1, 3)      # ... and checked at others, which shows the batch is dynamic
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
ONNX_INSTALL = "pip install 'fastcls[onnx]'  (= onnx onnxruntime onnxscript)"


class ExportMismatch(InferenceError):
    """The export ran but its outputs differ from eager PyTorch beyond the tolerance."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = checkpoint_parser("python -m fastcls.export", __doc__)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.image_size=288")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the exported file; PATH.json is written beside it")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    args = p.parse_intermixed_args(argv)
    if args.format == "exported-program" and Path(args.out).suffix != ".pt2":
        p.error(f"--out {args.out}: an exported program is a .pt2 file (torch.export.load expects it)")
    bad = [o for o in args.overrides if not is_override(o)]
    if bad:
        p.error(f"unexpected argument {bad[0]!r}: expected section.key=value")
    return args


def check_onnx_installed() -> None:
    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise InferenceError(f"--format onnx needs {', '.join(missing)}: {ONNX_INSTALL}")


def _batch_dim():
    return {0: torch.export.Dim("batch", min=1)}


def export_onnx(model, sample: torch.Tensor, path: Path, opset: Optional[int]) -> Callable:
    torch.onnx.export(model, (sample,), str(path), dynamo=True, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=(_batch_dim(),), opset_version=opset,
                      external_data=False, verbose=False)
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def export_exported_program(model, sample: torch.Tensor, path: Path, opset) -> Callable:
    ep = torch.export.export(model, (sample,), dynamic_shapes=(_batch_dim(),))
    torch.export.save(ep, str(path))
    return torch.export.load(str(path)).module()


def export_torchscript(model, sample: torch.Tensor, path: Path, opset) -> Callable:
    with warnings.catch_warnings():  # torch >= 2.10 deprecates torch.jit; the docstring says so
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.jit.save(torch.jit.trace(model, sample), str(path))
        return torch.jit.load(str(path))


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript,
             "exported-program": export_exported_program}
assert tuple(EXPORTERS) == FORMATS
RUNTIMES = {"onnx": lambda: f"onnxruntime {__import__('onnxruntime').__version__}",
            "torchscript": lambda: "torch.jit.load", "exported-program": lambda: "torch.export.load"}


def verify(run: Callable, model, size: int) -> dict:
    """The export (`run`) against eager `model` on random batches of VERIFY_BATCHES sizes."""
    gen = torch.Generator().manual_seed(0)
    worst, ok = 0.0, True
    with torch.no_grad():
        for n in VERIFY_BATCHES:
            x = torch.randn(n, 3, size, size, generator=gen)
            want, got = model(x), run(x).float()
            if got.shape != want.shape:
                raise InferenceError(f"the export returned shape {tuple(got.shape)} for a batch of "
                                     f"{n}, eager PyTorch {tuple(want.shape)}")
            diff = (got - want).abs()
            worst = max(worst, diff.max().item())
            ok &= bool((diff <= ATOL + RTOL * want.abs()).all())
    return {"against": "eager PyTorch, fp32, CPU", "batch_sizes": list(VERIFY_BATCHES),
            "max_abs_diff": worst, "atol": ATOL, "rtol": RTOL, "passed": ok}


def export(loaded, fmt: str, out: Path, opset: Optional[int] = None) -> dict:
    """Write the export of `loaded` to `out` (only once verified) and return the sidecar."""
    if fmt == "onnx":
        check_onnx_installed()
    cfg = loaded.cfg
    model = build_inference_model(loaded, torch.device("cpu")).float()
    model = model.to(memory_format=torch.contiguous_format)  # NCHW in, as the sidecar says
    size = val_image_size(cfg.data)  # the validation crop (data.val_image_size, else image_size)
    sample = torch.randn(SAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    result: dict = {}

    def write(tmp: Path) -> None:
        try:
            run = EXPORTERS[fmt](model, sample, tmp, opset)
        except InferenceError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters raise many types; one line for the user
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise InferenceError(f"--format {fmt}: exporting {cfg.model.name} failed "
                                 f"({type(e).__name__}: {msg})") from None
        result.update(verify(run, model, size), runtime=RUNTIMES[fmt]())
        if not result["passed"]:
            raise ExportMismatch(f"--format {fmt}: the export differs from eager PyTorch by up to "
                                 f"{result['max_abs_diff']:.3g} (allowed {ATOL:g} + {RTOL:g} x "
                                 f"|logit|); nothing written")

    write_atomic(out, write)
    sidecar = {
        "format": fmt, "file": out.name, "model": cfg.model.name, "checkpoint": loaded.path,
        "weights": "ema" if loaded.ema else "model",
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                  "layout": "NCHW", "values": "ImageNet-normalized RGB (see preprocessing)"},
        "output": {"name": "logits", "shape": ["batch", cfg.model.num_classes],
                   "values": "logits (softmax for probabilities)"},
        "preprocessing": preprocessing(cfg),
        "class_names": loaded.class_names(),
        "num_classes": cfg.model.num_classes,
        "verification": result,
        "torch": torch.__version__,
    }
    write_text_atomic(Path(f"{out}.json"), json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        loaded = load_checkpoint(args.checkpoint, args.overrides, ema=args.ema)
        side = export(loaded, args.format, out, args.opset)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ExportMismatch) else 2
    v = side["verification"]
    print(f"wrote {out} ({args.format}) and {out}.json")
    print(f"verified: {v['runtime']} vs eager PyTorch on batches of "
          f"{' and '.join(map(str, v['batch_sizes']))}: max |diff| {v['max_abs_diff']:.2g} "
          f"(tolerance {ATOL:g} + {RTOL:g} x |logit|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
