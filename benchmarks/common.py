"""What every benchmark JSON records about where it ran: machine, device, library versions,
the data set. Imported by the scripts in this folder (their directory is on sys.path when
run as `python benchmarks/X.py`)."""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import re
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" on a GPU; "CPU: AMD EPYC, 2 cores" on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def _version(dist: str, module: str | None = None) -> str | None:
    """Installed version of a distribution (or of a module found on sys.path), else None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        try:
            return getattr(importlib.import_module(module), "__version__", "unknown")
        except Exception:  # not installed, or installed but broken: either way not usable
            return None
    return None


def versions() -> dict:
    """Versions of everything that changes a loader or training number; None = not installed."""
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torchvision": _version("torchvision", "torchvision"),
         "triton": _version("triton", "triton"), "numpy": _version("numpy", "numpy"),
         "pillow": _version("pillow", "PIL") or _version("pillow-simd"),
         "dali": (_version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120")
                  or _version("nvidia-dali", "nvidia.dali")),
         "ffcv": _version("ffcv", "ffcv"),
         "nvimgcodec": (_version("nvidia-nvimgcodec-cu13") or _version("nvidia-nvimgcodec-cu12")
                        or _version("nvidia-nvimgcodec", "nvidia.nvimgcodec")),
         "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    return v


def machine_info(device: torch.device) -> dict:
    info = {"device": str(device), "device_name": device_name(device), "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "host": platform.node(),
            # 1-minute load average when the result was written: > cpu_cores means the
            # numbers were shared with other work
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            # kept for older readers of loader.json
            "host_cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def dataset_info(folder: str | os.PathLike) -> dict:
    """What the images were: make_jpegs.py's manifest when there is one, else name and count."""
    p = Path(folder)
    for d in (p, p.parent):
        m = d / "manifest.json"
        if m.is_file():
            man = json.loads(m.read_text())
            return {"name": f"make_jpegs v{man['request']['version']} seed {man['request']['seed']}",
                    "path": str(p), **{k: man[k] for k in
                                       ("images", "avg_width", "avg_height", "avg_kbytes",
                                        "fingerprint") if k in man}}
    name = "demo-v1" if "demo-v1" in p.parts else p.name
    # Average file size from a sample (up to 8 files from each of the first 64 class
    # folders): walking all of ImageNet would take minutes.
    sizes = []
    if p.is_dir():
        for cls in sorted(d for d in p.iterdir() if d.is_dir())[:64]:
            files = sorted(f for f in cls.iterdir() if f.is_file())[:8]
            sizes += [f.stat().st_size for f in files]
    kb = round(sum(sizes) / len(sizes) / 1024, 1) if sizes else None
    return {"name": name, "path": str(p), "avg_kbytes": kb, "avg_kbytes_sampled_files": len(sizes)}


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")
    return out


def device_slug(device: torch.device) -> str:
    """The device's name for a result file name ("cpu-intel-r-xeon-r-processor-2-cores")."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def hf_image_schema(class_names: list[str]):
    """The Arrow schema of a Hugging Face image-classification dataset as `datasets` writes
    it (an `Image` struct of bytes and path, an int64 `ClassLabel`, the features in the
    schema metadata), so a benchmark can write Parquet with pyarrow alone."""
    import pyarrow as pa
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(class_names)}}
    return pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("label", pa.int64())],
                     metadata={"huggingface": json.dumps({"info": {"features": features}})})
