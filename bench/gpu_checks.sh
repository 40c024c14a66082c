#!/usr/bin/env bash
# Full-size checks on a node with 2 GPUs (random weights of the published models):
#   1. launch/calibrate.py: the per-layer cost table of this card (into $OUT);
#   2. bench/bench.py: (b) one GPU, (a) the pipeline on that table (+ profile, CUDA-graph check), (c) the old
#      naive split, the (a)/(b) check of loss, gradients and update; extra options pass on;
#   3. the real launcher end to end on ds_configs/tta.json with 20 synthetic 512x683 images in 2 corruptions.
# Usage: OUT=bench/results bash bench/gpu_checks.sh [bench.py options]; logs stream into $OUT (8 files).
# DATA=<ADE20K-C root> uses a demo dataset built elsewhere (data/demo.py needs imagecorruptions).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/dusa-gpu}
E2E_TIMEOUT=${E2E_TIMEOUT:-200}
PY=${PYTHON:-python}
mkdir -p "$OUT" "$WORK"
CK=$WORK/bench/checkpoints
$PY -u launch/calibrate.py --out "$WORK/calibrate" > "$OUT/calibrate.log" 2>&1
TABLE=$(ls "$WORK"/calibrate/*.json 2>/dev/null | head -1)
[ -n "$TABLE" ] && cp "$TABLE" "$OUT/costs-$(basename "$TABLE")"
$PY -u bench/bench.py --workdir "$WORK/bench" --out "$OUT" --log "$OUT/bench.log" --check --profile \
  ${TABLE:+--cost_table "$TABLE"} "$@"
DATA=${DATA:-$WORK/ade20k_c}
[ -d "$DATA" ] || $PY -c "
from data.demo import make_demo_dataset
make_demo_dataset('$DATA', num_images=10, size=(512, 683))" > "$WORK/setup.log" 2>&1
timeout "$E2E_TIMEOUT" $PY -m deepspeed.launcher.runner --num_gpus 2 launch/tta.py --config ds_configs/tta.json \
  --model.segmenter "$CK/segformer-b5" --model.generator "$CK/sd3-medium" \
  --model.class_embeddings "$CK/sd3-medium-classes.safetensors" --data.root "$DATA" \
  --data.corruptions '[gaussian_noise,defocus_blur]' --logging.wandb.enabled false --logging.progress false \
  --output_dir "$WORK/e2e" > "$OUT/e2e.log" 2>&1
echo "launcher exit $?"; grep -v "INFO\|Loading weights" "$OUT/e2e.log" | tail -n 14
cp "$WORK/e2e/results.json" "$OUT/e2e-results.json" 2>/dev/null || true
