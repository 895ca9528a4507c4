"""Score a checkpoint on a validation set: val_loss / val_top1 / val_top5, as training prints them.

    python -m fastcls.eval runs/demo/best.pt
    python -m fastcls.eval runs/r50/best.pt data.val=/d/val data.backend=dali --out eval.json
    python -m fastcls.eval runs/r50/last.pt --ema data.batch_size=128 train.amp=off
    python -m fastcls.eval resnet50-11ad3fa6.pth model.name=resnet50 data.val=/imagenet/val
    torchrun --nproc_per_node=8 -m fastcls.eval runs/r50/best.pt data.val=/d/val

A fastcls checkpoint's saved config gives the model, the classes, the val transform, the
backend and AMP; `section.key=value` overrides change any of them (data.val, data.backend,
data.image_size / data.val_resize, train.amp, ...). A plain torchvision/timm state_dict needs
`model.name=...` and is scored against the val folder's classes in sorted order (ImageNet's
synset folders for torchvision's weights). The evaluation is the trainer's own
(`fastcls.train.evaluate`): same loader, same AMP, so a checkpoint scores what its training
run logged. Under torchrun every image is counted once. `--out eval.json` writes the same
keys plus per-class accuracy and the confusion matrix, and `eval_confusion.png` beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .atomic import write_atomic, write_text_atomic
from .config import resolve, to_dict
from .data import DatasetError, build_loader, closing_loaders
from .dist import DistInfo, all_reduce_sum, cleanup_distributed, setup_distributed
from .inference import USER_ERRORS, InferenceError, Loaded, build_inference_model, checkpoint_parser, load_checkpoint
from .log import summary_line
from .train import amp_setup, evaluate


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = checkpoint_parser("python -m fastcls.eval", __doc__)
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the checkpoint's config")
    p.add_argument("--ema", action="store_true", help="score the checkpoint's EMA weights")
    p.add_argument("--out", default=None, help="write the metrics, per-class accuracy and confusion "
                                               "matrix to this JSON file (+ a _confusion.png beside it)")
    return p.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    try:
        loaded = load_checkpoint(args.checkpoint, args.overrides, ema=args.ema, notes=notes)
        dist = setup_distributed(loaded.cfg.train.device)
    except (*USER_ERRORS, RuntimeError) as e:  # RuntimeError: train.device=cuda without CUDA
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if dist.is_main:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        with closing_loaders():  # the loader's workers stop at the end (see fastcls.train.main)
            result = run_eval(loaded, dist)
        if dist.is_main:
            print(summary_line({k: result[k] for k in ("val_loss", "val_top1", "val_top5", "val_images")}))
            if result["bad_files"]:
                print(f"WARNING: {result['bad_files']} undecodable val files were skipped (not scored)",
                      file=sys.stderr)
            if args.out:
                png = write_report(result, Path(args.out))
                print(f"wrote {args.out} and {png}")
        return 0
    except (*USER_ERRORS, DatasetError, FileNotFoundError) as e:
        print(f"error (rank {dist.rank}): {e}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


def run_eval(loaded: Loaded, dist: DistInfo) -> dict:
    """The trainer's evaluation of `loaded` on this rank's shard of data.val, summed over
    ranks: val_loss, val_top1, val_top5, val_images, plus `confusion` (C×C int64 tensor,
    row = true class), `classes`, `bad_files` (all ranks) and the config used."""
    cfg, device = loaded.cfg, dist.device
    autocast, dtype = amp_setup(cfg.train.amp, device)  # as in training
    model = build_inference_model(loaded, device)  # first: a wrong architecture is the likelier error
    loader = build_loader(cfg, "val", device, rank=dist.rank, world_size=dist.world_size,
                          dtype=dtype, classes=loaded.classes)
    classes = loaded.classes
    if classes is None:  # a plain state_dict: the folder's sorted classes are the model's outputs
        classes = list(loader.classes)
        if len(classes) != cfg.model.num_classes:
            raise InferenceError(f"data.val has {len(classes)} classes but the model has "
                                 f"{cfg.model.num_classes} outputs: a plain state_dict is scored "
                                 f"against the val folder's classes in sorted order, which must be "
                                 f"exactly the model's (set model.num_classes to match)")
    if len(classes) > cfg.model.num_classes:
        raise InferenceError(f"{loaded.path}: {len(classes)} classes but model.num_classes="
                             f"{cfg.model.num_classes}")
    eval_model = torch.compile(model) if cfg.model.compile else model
    pad = resolve(cfg, dist.world_size).batch_size if cfg.model.compile else None  # as training
    result = evaluate(eval_model, loader, autocast, dist, pad, tta=cfg.train.eval_tta,
                      confusion_classes=cfg.model.num_classes)
    bad = all_reduce_sum(torch.tensor([len(loader.bad_files)], device=device)).item()
    return {**result, "classes": classes, "bad_files": int(bad), "checkpoint": loaded.path,
            "weights": "ema" if loaded.ema else "model", "config": to_dict(cfg)}


def report(result: dict, names: list[str]) -> dict:
    """The JSON of --out: the metrics, per-class top-1 (% of the class's images) and the
    confusion matrix as lists (rows: true classes, columns: model outputs)."""
    conf = result["confusion"]
    per_class = {}
    for i, name in enumerate(result["classes"]):
        n = int(conf[i].sum())
        per_class[name] = {"top1": 100.0 * int(conf[i, i]) / n if n else None, "images": n}
    keys = ("checkpoint", "weights", "val_loss", "val_top1", "val_top5", "val_images", "bad_files")
    return {**{k: result[k] for k in keys}, "per_class": per_class,
            "confusion": {"rows": result["classes"], "columns": names,
                          "counts": conf[:len(result["classes"])].tolist()},
            "config": result["config"]}


def write_report(result: dict, out: Path) -> Path:
    """`out` (JSON) and `<stem>_confusion.png` beside it, each written atomically."""
    names = list(result["classes"]) + [str(i) for i in range(len(result["classes"]),
                                                              result["confusion"].shape[1])]
    write_text_atomic(out, json.dumps(report(result, names), indent=1) + "\n")
    png = out.with_name(f"{out.stem}_confusion.png")
    write_atomic(png, lambda tmp: plot_confusion(result, names, tmp))
    return png


def plot_confusion(result: dict, names: list[str], path: Path) -> None:
    """Row-normalized confusion matrix (share of each true class's images per prediction)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = result["confusion"][:len(result["classes"])].double()
    share = conf / conf.sum(1, keepdim=True).clamp(min=1)
    rows, cols = share.shape
    side = min(4 + 0.25 * max(rows, cols), 16)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if max(rows, cols) <= 40:  # readable tick labels; beyond that the image alone
        ax.set_xticks(range(cols), names, rotation=90, fontsize=7)
        ax.set_yticks(range(rows), result["classes"], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    ax.set_title(f"{Path(result['checkpoint']).name} ({result['weights']}): top-1 "
                 f"{result['val_top1']:.2f}% of {result['val_images']}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
