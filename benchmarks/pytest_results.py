"""A pytest plugin for benchmarks/device_check.sh: one JSON line per test outcome, appended to
$FASTCLS_TEST_RESULTS as each test ends (junit XML is written only when pytest ends, so a
step cut by its time limit would lose it). Loaded with `-p pytest_results` (benchmarks/ on
sys.path).

    {"test": "tests/test_kernels.py::test_x[fp16]", "outcome": "passed", "seconds": 1.2}

outcome: passed | failed | skipped | error (a setup or teardown failure)."""
from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("FASTCLS_TEST_RESULTS")
    if not path:
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:  # setup or teardown raised
        outcome = "error"
    elif report.when == "setup" and report.skipped:
        outcome = "skipped"
    else:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": outcome,
                            "seconds": round(report.duration, 3)}) + "\n")
        f.flush()
