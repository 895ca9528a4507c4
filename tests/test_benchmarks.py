"""Benchmark scripts run to completion on tiny settings (smoke, not timing)."""
import json
import subprocess

from conftest import PY, ROOT, run_env


def test_loader_benchmark_smoke(folder, tmp_path):
    out = tmp_path / "loader.json"
    proc = subprocess.run([PY, "benchmarks/loader.py", "--data", str(folder), "--batch-size", "4",
                           "--image-size", "32", "--workers", "1", "--warmup", "1", "--steps", "3",
                           "--repeats", "2", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    backends = {row["backend"]: row for row in r["results"]}
    assert {"native:workers", "native:batched", "synthetic", "pil_dataloader (baseline)"} <= set(backends)
    assert backends["pil_dataloader (baseline)"]["ratio_vs_pil"] == 1.0
    for row in r["results"]:
        assert row["img_per_s"] > 0 and len(row["runs"]) == 2
    assert r["machine"]["torch"] and r["settings"]["batch_size"] == 4
    assert "dali" in r["skipped"] or "dali" in backends
    assert "img/s" in proc.stdout


def test_loader_benchmark_bad_path(tmp_path):
    proc = subprocess.run([PY, "benchmarks/loader.py", "--data", str(tmp_path / "none")],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
