"""What a user sees: rank-0 messages, the progress bar, metrics.jsonl, config.yaml, curves.png,
and (train.tensorboard) TensorBoard event files in out_dir/tb."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import yaml
from tqdm import tqdm

from .atomic import WriteError, write_atomic, write_text_atomic
from .schema import ConfigError

TB_DIR = "tb"


def summary_writer(log_dir: Path):
    """torch's TensorBoard SummaryWriter; a one-line error when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard: true needs the tensorboard package: "
                          "pip install tensorboard  (or pip install 'fastcls[tensorboard]')") from None
    return SummaryWriter(log_dir=str(log_dir))


def summary_line(record: dict, quiet: tuple[str, ...] = ()) -> str:
    """`val_top1 71.3 | val_top5 90.1 | ...`: how a metrics record is printed."""
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in record.items() if k not in quiet)


class RunLog:
    """Writes only on rank 0 (`enabled=False` elsewhere); pass it around, no globals.
    With `tensorboard`, scalars also go to out_dir/tb: `scalars()` (the progress bar's, by
    global optimizer step) and every numeric metrics.jsonl value as `epoch/<key>` by epoch
    (strings as text). A context manager: leaving it closes (flushes) the event file."""

    def __init__(self, out_dir: str | Path, enabled: bool, progress: bool = True,
                 tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.progress = progress and enabled
        self.tb = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.tb = summary_writer(self.out_dir / TB_DIR)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars at global step `step` (host numbers: logging never syncs)."""
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg, file=sys.stdout)

    def warn(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(f"WARNING: {msg}", file=sys.stderr)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.progress, dynamic_ncols=True,
                    leave=False, file=sys.stdout, unit="step")

    def write_config(self, tree: dict) -> None:
        if self.enabled:
            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(tree, sort_keys=False))

    def metrics(self, record: dict, quiet: tuple[str, ...] = ()) -> None:
        """Append one JSON object per evaluation to metrics.jsonl and print a summary line
        (without the `quiet` keys, which the caller prints on their own line)."""
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: no half line left behind for the next reader
            if path.exists():
                os.truncate(path, size)
            raise WriteError(path, e) from None
        if self.tb is not None:
            epoch = record.get("epoch", 0)
            for k, v in record.items():
                if isinstance(v, str):
                    self.tb.add_text(f"epoch/{k}", v, epoch)
                elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.tb.add_scalar(f"epoch/{k}", v, epoch)
            self.tb.flush()  # once per evaluation: the curves survive a crash
        self.info(summary_line(record, quiet))

    def read_metrics(self) -> list[dict]:
        p = self.out_dir / "metrics.jsonl"
        if not p.is_file():
            return []
        text = p.read_text()
        whole, _, partial = text.rpartition("\n")
        if partial and self.enabled:  # a record cut by a kill mid-write: dropped, appends start clean
            os.truncate(p, len(text.encode()) - len(partial.encode()))
        return [json.loads(line) for line in whole.splitlines() if line.strip()]

    def plot(self) -> Optional[Path]:
        """curves.png: loss, accuracy (and the EMA model's, with train.ema) and LR per epoch
        from metrics.jsonl."""
        rows = self.read_metrics() if self.enabled else []
        if not rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in rows]
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        ax[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
        ax[0].plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
        ax[0].set_title("loss")
        ax[1].plot(ep, [r["train_top1"] for r in rows], "o-", label="train top-1")
        ax[1].plot(ep, [r["val_top1"] for r in rows], "o-", label="val top-1")
        ax[1].plot(ep, [r["val_top5"] for r in rows], "o-", label="val top-5")
        if all("val_top1_ema" in r for r in rows):  # train.ema on
            ax[0].plot(ep, [r["val_loss_ema"] for r in rows], "o--", label="val (EMA)")
            ax[1].plot(ep, [r["val_top1_ema"] for r in rows], "o--", label="val top-1 (EMA)")
        ax[1].set_title("accuracy (%)")
        ax[2].plot(ep, [r["lr"] for r in rows], "o-")
        ax[2].set_title("learning rate (end of epoch)")
        for a in ax:
            a.set_xlabel("epoch")
            a.grid(alpha=0.3)
        ax[0].legend()
        ax[1].legend()
        fig.tight_layout()
        out = self.out_dir / "curves.png"
        try:
            write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return out
