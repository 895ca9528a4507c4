"""Training images/sec on real JPEGs beside the same model on synthetic data, one process.

    python benchmarks/train.py pipelines/resnet50_bs256.yaml data.train=/d/train data.workers=16
    python benchmarks/train.py pipelines/resnet50_bs256.yaml data.train=/d/train model.compile=true \
        --warmup 15 --steps 30 --repeats 3 --out bench_out/train_r50_compiled.json
    python benchmarks/train.py pipelines/demo.yaml --steps 10          # CPU, the demo data

Builds the recipe's model, optimizer, loss, AMP, channels_last and compile setting once (and
the trainer's `set_determinism`: cuDNN autotuning unless train.deterministic) and
runs the trainer's own loop (`fastcls.train.train_one_epoch`, so every sync, augmentation
and stall measurement is the trainer's) over two loaders in turn: the `synthetic` backend
(a batch already on the device: the model's speed) and the recipe's backend on its
`data.train` folder. Each gets --warmup steps (compilation, cudnn autotuning, worker
start-up), then --repeats timed windows of --steps steps each; the median window is
reported. The real loader streams on through epoch ends, so a folder smaller than
(warmup + steps x repeats) x batch images includes epoch restarts (counted in the JSON).

Reports img/s of both, real / synthetic (1.0 = the loader costs nothing; the project's target
is >= 0.97) and data stall % (share of the real run's time spent waiting in `next(loader)`).
The LR is held at the recipe's peak value (the schedule costs nothing measurable).
JSON (config, device name, torch and backend versions, every window) to --out; a table is
printed last.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastcls.config import ConfigError, load_config, resolve, to_dict  # noqa: E402
from fastcls.data import DatasetError, build_loader, closing_loaders, dataset_paths  # noqa: E402
from fastcls.dist import DistInfo, pick_device  # noqa: E402
from fastcls.log import RunLog  # noqa: E402
from fastcls.loss import SmoothedCrossEntropy  # noqa: E402
from fastcls.models import build_model  # noqa: E402
from fastcls.optim import build_optimizer  # noqa: E402
from fastcls.train import EpochContext, amp_setup, set_determinism, train_one_epoch  # noqa: E402

from common import dataset_info, device_name, machine_info, now_utc, versions, write_json  # noqa: E402


class Window:
    """`steps` batches taken from a stream that outlives the window, so that consecutive
    windows see one continuous loader (workers and prefetch stay warm between them)."""

    def __init__(self, stream, steps: int, loader):
        self.stream, self.steps, self.loader = stream, steps, loader

    def __len__(self) -> int:
        return self.steps

    @property
    def bad_files(self) -> list:
        return self.loader.bad_files

    def epoch_warnings(self) -> list[str]:
        return []  # a window is not an epoch: the benchmark reports its own numbers

    def __iter__(self):
        return itertools.islice(self.stream, self.steps)


def endless(loader, counter: dict):
    """The loader's epochs back to back (set_epoch each time), counting epoch starts."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        counter["epochs_started"] = epoch + 1
        n = 0
        for n, batch in enumerate(loader, 1):
            yield batch
        if n == 0:  # else this loop would spin forever
            raise DatasetError(f"the loader yielded no batch in epoch {epoch}")


def run_backend(name: str, loader, ctx: EpochContext, args) -> dict:
    counter = {"epochs_started": 0}
    stream = endless(loader, counter)
    t0 = time.perf_counter()
    train_one_epoch(ctx, Window(stream, args.warmup, loader), epoch=0, step=0)
    warm_s = time.perf_counter() - t0
    rates, stalls = [], []
    for _ in range(args.repeats):
        stats, _ = train_one_epoch(ctx, Window(stream, args.steps, loader), epoch=0, step=0)
        rates.append(stats["img_per_s"])
        stalls.append(stats["data_stall"])
    stream.close()  # ends the loader's iterator (and its workers) before the next backend
    i = rates.index(statistics.median_low(rates))  # the median window's own stall
    row = {"backend": name, "img_per_s": rates[i], "data_stall_pct": stalls[i],
           "runs_img_per_s": rates, "runs_data_stall_pct": stalls, "warmup_s": warm_s,
           "epochs_started": counter["epochs_started"], "bad_files": len(loader.bad_files)}
    print(f"{name:>10}: {row['img_per_s']:.1f} img/s, stall {row['data_stall_pct']:.1f}% "
          f"(windows {', '.join(f'{r:.0f}' for r in rates)}; warm-up {warm_s:.1f} s)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML recipe, e.g. pipelines/resnet50_bs256.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for fastcls.train")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per backend")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--no-synthetic", action="store_true", help="time the real backend only")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared machine')")
    p.add_argument("--out", default="bench_out/train.json")
    args = p.parse_intermixed_args(argv)
    for key in ("warmup", "steps", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")

    try:
        cfg = load_config(args.config, args.overrides)
        res = resolve(cfg, 1)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    # The trainer's kernel choice (cuDNN autotuning unless train.deterministic), so both
    # numbers are the trainer's.
    set_determinism(cfg.train.deterministic)
    autocast, data_dtype = amp_setup(cfg.train.amp, device)

    # Loaders first: a bad folder fails before the model is built.
    real_cfg = cfg
    synth_cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, backend="synthetic", synthetic_images=res.batch_size * args.steps))
    try:
        real = build_loader(real_cfg, "train", device, dtype=data_dtype)
        resolve(cfg, 1, real.dataset_size)  # fewer images than one batch: a ConfigError
        if len(real.classes) > cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but data.train has "
                              f"{len(real.classes)} classes; set model.num_classes={len(real.classes)}")
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, cfg.model.num_classes, blurpool=cfg.model.blurpool,
                        zero_init_residual=cfg.model.zero_init_residual).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ctx = EpochContext(
        # Compiled once: both backends feed the same shapes and dtype, so no recompilation.
        model=torch.compile(model) if cfg.model.compile else model,
        optimizer=build_optimizer(cfg.optim, model, res.lr),
        scaler=torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None,
        criterion=SmoothedCrossEntropy(cfg.model.num_classes, cfg.augment.label_smoothing),
        lr_at=lambda step: res.lr,
        autocast=autocast,
        augmenter=None, cfg=cfg, dist=dist, log=RunLog(ROOT / "bench_out", enabled=False))

    print(f"benchmarks/train.py: {cfg.model.name} bs {res.batch_size} {cfg.data.image_size}px "
          f"amp {cfg.train.amp} channels_last {cfg.model.channels_last} compile {cfg.model.compile} "
          f"on {device_name(device)}", flush=True)
    rows = []
    settings = {"model": cfg.model.name, "batch_size": res.batch_size,
                "image_size": cfg.data.image_size, "amp": cfg.train.amp,
                "channels_last": cfg.model.channels_last, "compile": cfg.model.compile,
                "backend": cfg.data.backend, "workers": cfg.data.workers,
                "deterministic": cfg.train.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}
    if getattr(real, "decoder", None):  # the batched path's resolved decoder
        settings["decoder"] = real.decoder

    def result(complete: bool) -> dict:
        synth = next((r for r in rows if r["backend"] == "synthetic"), None)
        done = complete and rows and rows[-1]["backend"] == cfg.data.backend
        return {"benchmark": "train", "time": now_utc(), "config_file": args.config,
                "overrides": args.overrides, "note": args.note, "complete": complete,
                "machine": machine_info(device), "versions": versions(), "settings": settings,
                "dataset": ({"name": "synthetic"} if cfg.data.backend == "synthetic" else
                            {**dataset_info(dataset_paths(cfg)[0]), "images": real.dataset_size}),
                "results": rows,
                "ratio_real_vs_synthetic": rows[-1]["img_per_s"] / synth["img_per_s"]
                if synth and done else None, "config": to_dict(cfg)}

    try:
        if not args.no_synthetic and cfg.data.backend != "synthetic":
            rows.append(run_backend("synthetic", build_loader(synth_cfg, "train", device,
                                                              dtype=data_dtype),
                                    ctx, args))
            write_json(args.out, result(False))  # a run cut in the real backend keeps this
        rows.append(run_backend(cfg.data.backend, real, ctx, args))
    except DatasetError as e:  # e.g. more undecodable files than data.max_bad_fraction
        print(f"error: {e}", file=sys.stderr)
        return 2
    synth = next((r for r in rows if r["backend"] == "synthetic"), None)
    out = write_json(args.out, result(True))

    print(f"\ntraining throughput on {device_name(device)}: {cfg.model.name}, batch "
          f"{res.batch_size}, {cfg.data.image_size}px, amp {cfg.train.amp}, "
          f"compile {cfg.model.compile}")
    print(f"{'backend':<14}{'img/s':>12}{'stall %':>10}{'x synthetic':>14}")
    for r in rows:
        x = f"{r['img_per_s'] / synth['img_per_s']:.3f}" if synth else "-"
        print(f"{r['backend']:<14}{r['img_per_s']:>12.1f}{r['data_stall_pct']:>10.1f}{x:>14}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with closing_loaders():  # the loaders' workers stop before the interpreter exits
        sys.exit(main())
