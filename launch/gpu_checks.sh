#!/usr/bin/env bash
# Full-size checks on a node with 2 GPUs (random weights of the published models):
#   1. the real launcher end to end on ds_configs/tta.json with 20 synthetic 512x683 images in 2 corruptions;
#   2. launch/bench.py: (a) pipeline, (b) one GPU, (c) the old naive split, + the (a)/(b) gradient check.
# Usage: OUT=bench/results bash launch/gpu_checks.sh [bench.py options]; logs stream into $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/dusa-gpu}
E2E_TIMEOUT=${E2E_TIMEOUT:-300}
mkdir -p "$OUT" "$WORK"
CK=$WORK/bench/checkpoints
python -c "
from data.classes import ADE20K_CLASSES; from data.demo import make_demo_dataset
from models.architectures import make_random_checkpoints
make_random_checkpoints('$CK', ADE20K_CLASSES, device='cuda')
make_demo_dataset('$WORK/ade20k_c', num_images=10, size=(512, 683))" > "$OUT/setup.log" 2>&1
timeout "$E2E_TIMEOUT" deepspeed --num_gpus 2 launch/tta.py --config ds_configs/tta.json \
  --model.segmenter "$CK/segformer-b5" --model.generator "$CK/sd3-medium" \
  --model.class_embeddings "$CK/sd3-medium-classes.safetensors" --data.root "$WORK/ade20k_c" \
  --data.corruptions '[gaussian_noise,defocus_blur]' --logging.wandb.enabled false --logging.progress false \
  --output_dir "$OUT/e2e" > "$OUT/e2e.log" 2>&1
echo "launcher exit $?"; grep -v "INFO\|Loading weights" "$OUT/e2e.log" | tail -n 12
python -u launch/bench.py --workdir "$WORK/bench" --out "$OUT" --log "$OUT/bench.log" --check "$@"
