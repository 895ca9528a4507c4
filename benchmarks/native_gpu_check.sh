#!/usr/bin/env bash
# Prepared checks of the native batched GPU path (issue 5) for ONE call on a lent GPU machine:
#   bash benchmarks/native_gpu_check.sh          # ~4-6 min on an H100/H200; results in $OUT/native_gpu/
# 1. pytest -m gpu of the kernel and batched-loader tests (Triton compiled vs the reference,
#    nvJPEG/nvImageCodec + Triton vs the CPU path, bad/odd files on the GPU);
# 2. ImageNet-like JPEGs (~300-500 px, q90) generated into $DATA (or reused);
# 3. benchmarks/kernels.py: the fused kernel vs the per-image torch loop;
# 4. benchmarks/loader.py: native batched (torchvision, nvImageCodec) vs PIL workers vs the
#    torchvision DataLoader baseline, same folder, same process;
# 5. ResNet-50 training img/s, native batched vs synthetic data (epoch 2 of 2).
# Env knobs (a CPU dry run: DEVICE=cpu N_IMAGES=48 BATCH=8 SIZE=32 WORKERS=2 EPOCH_MODEL=resnet18):
#   DEVICE=cuda N_IMAGES=4000 BATCH=256 SIZE=224 WORKERS=8 DATA=/tmp/fastcls_jpegs EPOCH_MODEL=resnet50
# nvImageCodec rows need it installed first (pip install 'fastcls[nvimgcodec-cu13]' or the wheels
# carried to the machine); without it they are reported as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}; N=${N_IMAGES:-4000}; B=${BATCH:-256}; SIZE=${SIZE:-224}
WORKERS=${WORKERS:-8}; DATA=${DATA:-/tmp/fastcls_jpegs}; MODEL=${EPOCH_MODEL:-resnet50}
RES="${OUT:-/tmp}/native_gpu"; mkdir -p "$RES"
log() { echo "== $(date +%T) $*"; }

if [ "$DEVICE" = cuda ]; then
  log "1. pytest -m gpu"
  $PY -m pytest -q -m gpu tests/test_kernels.py tests/test_native_batched.py -p no:cacheprovider \
      -W ignore::DeprecationWarning 2>&1 | tail -15 | tee "$RES/pytest_gpu.txt"
fi

log "2. JPEGs: $N train + 10/class val into $DATA"
$PY - "$DATA" "$N" <<'EOF'
import os, sys
from multiprocessing import Pool
from pathlib import Path
import numpy as np
from PIL import Image
root, n = Path(sys.argv[1]), int(sys.argv[2])
def one(job):
    split, i = job
    p = root / split / f"c{i % 10}" / f"{i:06d}.jpg"
    if p.exists():
        return
    rng = np.random.default_rng(i + (10**6 if split == "val" else 0))
    w, h = int(rng.integers(300, 501)), int(rng.integers(300, 501))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0.005, 0.05, 3); ph = rng.uniform(0, 6, 3)
    img = np.stack([127 + 100 * np.sin(xx * a[c] + yy * a[(c + 1) % 3] + ph[c]) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)   # texture so JPEG sizes are ImageNet-like (~50-100 KB)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
jobs = [("train", i) for i in range(n)] + [("val", i) for i in range(100)]
with Pool(min(16, os.cpu_count() or 1)) as pool:
    pool.map(one, jobs, chunksize=32)
print("jpegs ready", n)
EOF

log "3. kernel vs per-image loop"
$PY -W ignore benchmarks/kernels.py --device "$DEVICE" --batch "$B" --size "$SIZE" --steps 10 --repeats 3 \
    --out "$RES/kernels.json" 2>&1 | grep -v "nvjpeg\|nvtiff\|Note:" | tail -6

log "4. loader img/s"
$PY -W ignore benchmarks/loader.py --data "$DATA/train" --batch-size "$B" --image-size "$SIZE" \
    --workers "$WORKERS" --device "$DEVICE" --warmup 3 --steps 10 --repeats 3 \
    --backends native:batched:torchvision,native:batched:nvimgcodec,native:workers,synthetic \
    --out "$RES/loader.json" 2>&1 | grep -v "nvjpeg\|nvtiff\|Note:" | tail -9

log "5. training img/s: native batched vs synthetic ($MODEL)"
for src in native synthetic; do
  $PY -W ignore -m fastcls.train pipelines/resnet50_bs256.yaml model.name="$MODEL" \
      data.train="$DATA/train" data.val="$DATA/val" data.backend=$src data.native_decode=batched \
      data.synthetic_images="$N" data.global_batch_size="$B" data.image_size="$SIZE" \
      data.val_resize="$(( SIZE * 8 / 7 ))" data.workers="$WORKERS" train.device="$DEVICE" \
      train.epochs=2 train.progress=false train.log_every=1000 train.out_dir="$RES/train_$src" \
      > "$RES/train_$src.log" 2>&1 || { echo "train $src failed:"; tail -5 "$RES/train_$src.log"; }
done
$PY - "$RES" <<'EOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1]); out = {}
for src in ("native", "synthetic"):
    f = res / f"train_{src}" / "metrics.jsonl"
    if f.exists():
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out[src] = {"img_per_s_epoch2": rows[-1]["img_per_s"], "data_stall": rows[-1]["data_stall"]}
if len(out) == 2:
    out["native_vs_synthetic"] = out["native"]["img_per_s_epoch2"] / out["synthetic"]["img_per_s_epoch2"]
(res / "train.json").write_text(json.dumps(out, indent=2))
print(json.dumps(out, indent=2))
EOF
log "done: $RES"
