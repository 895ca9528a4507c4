#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (docs/benchmarks.md: Python 3.12, torch 2.11,
# no DALI unless .dali4/install.sh is sourced, project not installed). About 6 minutes; every
# result as JSON under $OUT. It is the only GPU script: the DALI, native-batched and kernel
# measurements are steps here.
#
#   OUT=/tmp/out bash benchmarks/device_check.sh                 # on the GPU machine
#   source .dali4/install.sh && bash benchmarks/device_check.sh   # ... with DALI
#   OUT=/tmp/smoke bash benchmarks/device_check.sh --smoke       # same steps, tiny, on CPU
#
# Steps, in order of value, each under its own time limit from PLAN below (the limits add up
# to at most BUDGET_S - SLACK_S = 510 s: one device call may run 600 s, and start-up, the
# summary and the transfers need the rest), measurements and the GPU tests of the data path
# first so that a run cut short still reports them; a step that fails or times out is
# recorded and the next one runs:
#   env -> make_jpegs -> kernels.py (fused crop kernel vs per-image loop) -> loader.py 224px
#   (every installed backend: native PIL workers, native batched, DALI, ffcv; PIL baseline)
#   -> train.py ResNet-50 eager on native, ResNet-50 on DALI (when DALI imports; else
#   recorded "absent", not failed), ResNet-18 -> pytest_gpu: the GPU tests of the data path,
#   in order of value (kernels, batched, loaders, shards, DALI: GPU_TESTS_FIRST) -> train.py
#   ResNet-50 torch.compile -> pytest_gpu_rest: the other GPU tests (augment, optimizers,
#   compile, inference: GPU_TESTS_REST) -> pytest -m "gpu and slow" (a cold compile,
#   kill-and-resume) with what is left.
# Results are written as they come: every benchmark rewrites its JSON after each row
# ("complete": false until its end), every test outcome is appended to tests.jsonl as the
# test ends (benchmarks/pytest_results.py; the junit XML only comes at a step's end).
# $OUT gets env.json, pytest_*.xml, tests.jsonl, kernels.json, loader_224.json, train_*.json,
# one .log per step and summary.json (each step's exit code and seconds, the tests' outcomes,
# the headline numbers, "status"); a table is printed last, then the status line:
# "measured, N tests failed" (+ the steps cut by their limit or the budget, which are not
# failures: a step that cannot fit is reported, not failed). Exit 0 when no step failed and
# no test failed, else 1. Environment: OUT (default bench_out/device), PYTHON (python3), BUDGET_S (540),
# BENCH_DATA (JPEG folder, default /tmp/fastcls_bench_jpegs; reused when its manifest matches),
# DRY_RUN=1 (print the plan (step, limit) and each step's command to stdout and
# $OUT/commands.txt instead of running them).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: [OUT=DIR] bash benchmarks/device_check.sh [--smoke]" >&2; exit 2 ;;
esac
OUT=${OUT:-bench_out/device}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
SLACK_S=30  # of BUDGET_S, never planned: start-up, the summary, the transfers
# Step -> time limit (s), in running order; tests/test_benchmarks.py checks they fit
# BUDGET_S - SLACK_S.
PLAN=(env:15 make_jpegs:35 kernels:30 loader_224:70 train_resnet50_eager:45
      train_resnet50_dali:45 train_resnet18_eager:35 pytest_gpu:60 train_resnet50_compiled:100
      pytest_gpu_rest:45 pytest_gpu_slow:30)
# The GPU tests in order of value: the data path's first (every file with a gpu test is in one
# of the two lists: tests/test_benchmarks.py checks it), the rest after the compiled run.
GPU_TESTS_FIRST=(tests/test_kernels.py tests/test_batched.py tests/test_data.py
                 tests/test_shards.py tests/test_dali.py)
GPU_TESTS_REST=(tests/test_augment_policy.py tests/test_optimizers.py tests/test_resume.py
                tests/test_ffcv.py tests/test_train.py tests/test_loop_features.py
                tests/test_inference.py)
# Many DataLoader workers x prefetched batches x file descriptors: lift the default 1024.
ulimit -n "$(ulimit -Hn)" 2> /dev/null || ulimit -n 65536 2> /dev/null || true
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the project is not installed there
export PYTHONUNBUFFERED=1
: > "$OUT/steps.tsv"; : > "$OUT/tests.jsonl"; rm -f "$OUT/commands.txt"

if (( SMOKE )); then
  # Tiny and on the CPU: checks that every step runs and writes its JSON, not speed
  # (fp32: bf16 convolutions are slow on CPUs without bf16 units).
  # torch.compile on a 2-core CPU takes minutes, so the smoke's "compiled" step runs with
  # dynamo disabled (recorded in its note); tests/test_train.py covers compile on CPU.
  DATA=${BENCH_DATA:-$OUT/jpegs}
  JPEGS=(--classes 2 --per-class 6 --workers 2)
  DEV=(train.device=cpu train.amp=off data.workers=1 data.image_size=32 data.val_resize=32)
  # one backend (the PIL workers) beside the baseline: tests/test_benchmarks.py runs them all
  LOADER=(--batch-size 4 --image-size 32 --workers 1 --warmup 1 --steps 2 --repeats 1 --device cpu
          --backends native:workers)
  # the pytest steps' plumbing on one file (every gpu test skips on a CPU anyway)
  GPU_TESTS_FIRST=(tests/test_kernels.py); GPU_TESTS_REST=(tests/test_kernels.py)
  TESTS=tests/test_kernels.py
  KERNELS=(--device cpu --batch 4 --size 32 --min-side 40 --max-side 64 --dtype fp32 --warmup 1 --steps 1 --repeats 1)
  # The demo's resnet_tiny stands in for ResNet-50/18 (the same code path; a ResNet-50 step
  # on a busy 2-core CPU takes seconds).
  R50=(model.name=resnet_tiny data.global_batch_size=2); R18=("${R50[@]}")
  TIMING=(--warmup 1 --steps 1 --repeats 1 --note "smoke run on CPU: not a measurement")
  COMPILE_ENV=(env TORCHDYNAMO_DISABLE=1)
  COMPILE_NOTE="smoke run on CPU with TORCHDYNAMO_DISABLE=1: compile not exercised"
else
  # 100 classes x 52 = 5,200 JPEGs (~570 MB, ~10 s on 16 cores): a ResNet-50 run reads
  # (10 + 3 x 25) x 256 = 21,760 images, so ~4 epochs of it (epoch restarts counted in the JSON).
  DATA=${BENCH_DATA:-/tmp/fastcls_bench_jpegs}
  JPEGS=(--classes 100 --per-class 52 --workers "$(nproc)")
  DEV=(data.workers=16)
  LOADER=(--batch-size 256 --image-size 224 --workers 16 --warmup 5 --steps 20 --repeats 3 --device cuda)
  KERNELS=(--device cuda --batch 256 --size 224 --warmup 3 --steps 10 --repeats 3)
  R50=(data.global_batch_size=256); R18=(data.global_batch_size=512)
  TIMING=(--warmup 10 --steps 25 --repeats 3)
  TESTS=tests
  COMPILE_ENV=()
  COMPILE_NOTE=""
fi

START=$SECONDS
# record NAME RC SECONDS: one line of steps.tsv (RC: exit code, "skipped" or "absent").
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$OUT/steps.tsv"; }

# limit_of NAME: the step's limit in PLAN.
limit_of() {
  local entry
  for entry in "${PLAN[@]}"; do [[ ${entry%%:*} == "$1" ]] && { echo "${entry#*:}"; return; }; done
  echo "device_check.sh: step $1 is not in PLAN" >&2; exit 2
}
total=0
for entry in "${PLAN[@]}"; do total=$(( total + ${entry#*:} )); done
echo "plan: ${#PLAN[@]} steps, limits adding up to ${total}s of BUDGET_S=${BUDGET_S}s (${SLACK_S}s kept as slack)"
for entry in "${PLAN[@]}"; do printf 'plan: %-26s %4ss\n' "${entry%%:*}" "${entry#*:}"; done

# step NAME CMD...: run CMD with stdout+stderr to $OUT/NAME.log under min(its PLAN limit, what
# is left of the budget); record "NAME rc seconds" in steps.tsv; show the log's last lines.
step() {
  local name=$1 limit
  limit=$(limit_of "$name") || exit 2
  shift
  local left=$(( BUDGET_S - SLACK_S - (SECONDS - START) ))
  if (( left < 15 )); then
    record "$name" skipped 0
    echo "== $name: skipped, budget of ${BUDGET_S}s spent"
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s)"
  if [[ -n ${DRY_RUN:-} ]]; then  # print the command instead of running it
    printf '%s:' "$name" >> "$OUT/commands.txt"; printf ' %q' "$@" >> "$OUT/commands.txt"
    echo >> "$OUT/commands.txt"; printf '   '; printf ' %q' "$@"; echo
    record "$name" 0 0
    return
  fi
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  record "$name" "$rc" "$(( SECONDS - t0 ))"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
  (( rc == 124 || rc == 137 )) && echo "   TIMED OUT after ${limit}s"
  (( rc != 0 )) && echo "   exit code $rc (see $OUT/$name.log)"
}

env_info() {
  command -v nvidia-smi > /dev/null && \
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  "$PY" - "$OUT/env.json" <<'EOF'
import json, os, sys
sys.path.insert(0, "benchmarks")
import torch
from common import machine_info, now_utc, versions
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
info = {"benchmark": "env", "time": now_utc(), "machine": machine_info(dev), "versions": versions(),
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
if dev.type == "cuda":
    x = torch.randn(8, device=dev)
    torch.optim.SGD([torch.nn.Parameter(x)], lr=0.1, momentum=0.9, fused=True)
    info["sgd_fused_cuda"] = True
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info["versions"]))
EOF
}

# gpu_tests MARKS XML FILE...: the GPU tests of FILEs in that order, one result line each in
# the log (-v) and one JSON line each in $OUT/tests.jsonl as each ends (a step cut short keeps
# them; the junit XML is written only at the end), 60 s per test at most.
gpu_tests() {
  local marks=$1 xml=$2 per_test=()
  shift 2
  "$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout=60)  # when installed
  PYTHONPATH=$PWD/benchmarks:$PYTHONPATH FASTCLS_TEST_RESULTS=$OUT/tests.jsonl \
    "$PY" -m pytest -m "$marks" -v -p no:cacheprovider -p pytest_results "${per_test[@]}" \
    --junitxml="$xml" "$@"
  local rc=$?
  (( rc == 5 )) && { echo "no test is marked $1"; return 0; }  # 5 = nothing collected
  return $rc
}

export -f env_info gpu_tests  # `timeout` runs programs: the functions run in a child bash
export PY OUT TESTS
step env bash -c env_info
step make_jpegs "$PY" benchmarks/make_jpegs.py --out "$DATA" "${JPEGS[@]}"
step kernels "$PY" benchmarks/kernels.py "${KERNELS[@]}" --out "$OUT/kernels.json"
step loader_224 "$PY" benchmarks/loader.py --data "$DATA/train" "${LOADER[@]}" \
  --out "$OUT/loader_224.json"
step train_resnet50_eager "$PY" benchmarks/train.py pipelines/resnet50_bs256.yaml \
  data.train="$DATA/train" "${DEV[@]}" "${R50[@]}" "${TIMING[@]}" \
  --out "$OUT/train_resnet50_eager.json"
if [[ -n ${DRY_RUN:-} ]] || "$PY" -c "import nvidia.dali" 2> /dev/null; then
  step train_resnet50_dali "$PY" benchmarks/train.py pipelines/resnet50_bs256.yaml \
    data.backend=dali data.train="$DATA/train" "${DEV[@]}" "${R50[@]}" "${TIMING[@]}" \
    --out "$OUT/train_resnet50_dali.json"
else  # not an error: the GPU machine has no DALI unless .dali4/install.sh was sourced
  record train_resnet50_dali absent 0
  echo "== train_resnet50_dali: absent (DALI does not import; source .dali4/install.sh first)"
fi
step train_resnet18_eager "$PY" benchmarks/train.py pipelines/resnet50_bs256.yaml \
  model.name=resnet18 data.train="$DATA/train" "${DEV[@]}" "${R18[@]}" "${TIMING[@]}" \
  --out "$OUT/train_resnet18_eager.json"
step pytest_gpu bash -c 'gpu_tests "gpu and not slow" "$OUT/pytest_gpu.xml" "$@"' _ \
  "${GPU_TESTS_FIRST[@]}"
step train_resnet50_compiled "${COMPILE_ENV[@]}" "$PY" benchmarks/train.py \
  pipelines/resnet50_bs256.yaml model.compile=true data.train="$DATA/train" "${DEV[@]}" \
  "${R50[@]}" "${TIMING[@]}" ${COMPILE_NOTE:+--note "$COMPILE_NOTE"} \
  --out "$OUT/train_resnet50_compiled.json"
step pytest_gpu_rest bash -c 'gpu_tests "gpu and not slow" "$OUT/pytest_gpu_rest.xml" "$@"' _ \
  "${GPU_TESTS_REST[@]}"
step pytest_gpu_slow bash -c 'gpu_tests "gpu and slow" "$OUT/pytest_gpu_slow.xml" "$TESTS"'

"$PY" - "$OUT" "$(( SECONDS - START ))" "$SMOKE" <<'EOF'
import json, sys
from pathlib import Path
out, total, smoke = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps.append({"step": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(secs)})
rows = []
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
env = load("env.json") or {}
kernels = load("kernels.json")
if kernels:
    for r in kernels["results"]:
        rows.append((f"kernel 224px: {r['impl']}", f"{r['img_per_s']:,.0f} img/s",
                     f"x loop {r['speedup_vs_loop']:.2f}" if "speedup_vs_loop" in r else ""))
loader = load("loader_224.json")
if loader:
    for r in loader["results"]:
        if r["backend"] != "synthetic":
            dec = f" ({r['decoder']})" if r.get("decoder") else ""
            rows.append((f"loader 224px: {r['backend']}{dec}", f"{r['img_per_s']:,.0f} img/s",
                         f"x PIL {r['ratio_vs_pil']:.2f}" if r.get("ratio_vs_pil") else ""))
for name in ("train_resnet50_eager", "train_resnet50_dali", "train_resnet18_eager",
             "train_resnet50_compiled"):
    t = load(name + ".json")
    if not t:
        continue
    by = {r["backend"]: r for r in t["results"]}
    real, syn = by.get(t["settings"]["backend"]), by.get("synthetic")
    rows.append((f"{name[6:]}: synthetic", f"{syn['img_per_s']:,.1f} img/s" if syn else "-", ""))
    rows.append((f"{name[6:]}: {t['settings']['backend']}",
                 f"{real['img_per_s']:,.1f} img/s" if real else "-",
                 f"x synthetic {t['ratio_real_vs_synthetic']:.3f}, stall {real['data_stall_pct']:.1f}%"
                 if real and t.get("ratio_real_vs_synthetic") else ""))
# A step cut by its limit (timeout: 124, or 137 after -k) or skipped for the budget did not fit:
# reported, not failed. A pytest step's rc 1 is its failed tests, counted from tests.jsonl.
CUT = (124, 137, "skipped")
cut = [s["step"] for s in steps if s["rc"] in CUT]
failed = [s["step"] for s in steps if s["rc"] not in (0, "absent", *CUT)
          and not (s["step"].startswith("pytest_") and s["rc"] == 1)]
results = [json.loads(x) for x in (out / "tests.jsonl").read_text().splitlines() if x.strip()] \
    if (out / "tests.jsonl").is_file() else []
counts = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "error", "skipped")}
bad_tests = [r["test"] for r in results if r["outcome"] in ("failed", "error")]
status = f"measured, {len(bad_tests)} tests failed"
if cut:
    status += f"; did not fit: {', '.join(cut)}"
if failed:
    status += f"; steps failed: {', '.join(failed)}"
summary = {"benchmark": "device_check", "smoke": smoke, "total_seconds": total,
           "device": (env.get("machine") or {}).get("device_name"), "versions": env.get("versions"),
           "status": status, "steps": steps, "failed": failed, "cut": cut,
           "tests": {**counts, "failed_tests": bad_tests},
           "headline": [{"what": a, "value": b, "ratio": c} for a, b, c in rows]}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\ndevice_check {'(smoke) ' if smoke else ''}on {summary['device']}: {total}s")
for s in steps:
    print(f"  {s['step']:<26} rc {str(s['rc']):>7} {s['seconds']:>5}s")
for a, b, c in rows:
    print(f"  {a:<40}{b:>16}  {c}")
print(f"failed steps: {', '.join(failed) or 'none'}; JSON in {out}")
print(f"tests: {counts['passed']} passed, {len(bad_tests)} failed, {counts['skipped']} skipped"
      + "".join(f"\n  FAILED {t}" for t in bad_tests))
print(status)
sys.exit(1 if failed or bad_tests else 0)
EOF
