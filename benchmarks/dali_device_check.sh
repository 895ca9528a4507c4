#!/usr/bin/env bash
# The DALI measurements of issue 3, as one call on a lent GPU machine (/work/shared/device/README.md):
#   1. loader img/s, 224 px, batch 256: dali vs native vs the PIL DataLoader baseline, same JPEGs;
#   2. ResNet-50 bf16 channels_last training img/s: data.backend=dali vs synthetic;
#   3. the GPU-marked DALI tests.
# Results (JSON + logs) go to $OUT (default bench_out/dali). NOT RUN YET: written without a GPU.
#
#   bash ../shared/device/dali_bundle.sh     # first: DALI for CUDA 13 (see the device README)
#   OUT=$OUT bash benchmarks/dali_device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/dali}
N=${N:-5120}                  # JPEGs generated (20 steps of 256 per epoch)
DATA=${DATA:-/tmp/dali_jpegs} # ImageFolder of ImageNet-like JPEGs; generated when missing
WORKERS=${WORKERS:-16}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [ ! -d "$DATA" ]; then  # ~500x375 smooth random photos-like JPEGs, q90 (~50 KB), 10 classes
  python - "$DATA" "$N" <<'EOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for i in range(n):
    w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
    low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(low, np.int16) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    p = root / f"c{i % 10}" / f"{i:05d}.jpg"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(p, quality=90)
EOF
fi
du -sh "$DATA" | tee "$OUT/data.txt"

# 1. loader only
python benchmarks/loader.py --data "$DATA" --device cuda --batch-size 256 --image-size 224 \
  --workers "$WORKERS" --warmup 5 --steps 15 --repeats 3 --backends dali,native \
  --out "$OUT/loader.json" 2>&1 | tee "$OUT/loader.log" || true

# 2. training: epoch 3's img/s (epochs 1-2 include cudnn autotuning and DALI start-up)
for backend in synthetic dali; do
  python -m fastcls.train pipelines/resnet50_bs256.yaml "data.backend=$backend" \
    "data.train=$DATA" "data.val=$DATA" "data.synthetic_images=$N" model.num_classes=10 \
    "data.workers=$WORKERS" train.epochs=3 train.eval_every=100 train.progress=false \
    "train.out_dir=$OUT/train_$backend" 2>&1 | tail -5 | tee "$OUT/train_$backend.log" || true
done
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for b in ("synthetic", "dali"):
    f = out / f"train_{b}" / "metrics.jsonl"
    if f.exists():
        rows[b] = json.loads(f.read_text().splitlines()[-1])
if len(rows) == 2:
    s, d = rows["synthetic"]["img_per_s"], rows["dali"]["img_per_s"]
    print(f"ResNet-50 train img/s: synthetic {s:.0f}, dali {d:.0f} ({100 * (1 - d / s):.1f}% slower), "
          f"dali data stall {rows['dali']['data_stall']:.1f}%")
(out / "train.json").write_text(json.dumps(rows, indent=2))
EOF

# 3. GPU tests of the DALI backend
python -m pytest tests/test_dali.py -m gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/pytest_gpu.log"
