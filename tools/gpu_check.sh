#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, in one run on a machine with a CUDA GPU:
#   1. tools/benchmark.py on DETR-R50 at 800x1066 (batch 1, and batch 8 for throughput) and a training step, every
#      mode, once with the automatic autocast type and once with each type forced (bfloat16, float16);
#   2. 200 training steps of the synthetic demo with each autocast type (the loss must fall, nothing non-finite).
# Usage: bash tools/gpu_check.sh [OUT_DIR]   (results: OUT_DIR/benchmark_*.json and OUT_DIR/train_*/log.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
py=${PYTHON:-python}
mkdir -p "$out"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())"
for dtype in auto bfloat16 float16; do
    "$py" tools/benchmark.py --device cuda --repeats 10 --amp_dtype "$dtype" --modes exact,fast,amp,amp+channels_last,compiled \
        --skip coco_eval,pipeline --output "$out/benchmark_$dtype.json" | tee "$out/benchmark_$dtype.txt"
done
# 200 steps: 1600 images at batch 8, one epoch, evaluated at its end.
for dtype in bfloat16 float16; do
    "$py" main.py --dataset_file synthetic --device cuda --amp --amp_dtype "$dtype" --epochs 1 \
        --synthetic_train_size 1600 --output_dir "$out/train_$dtype" --no_plots | tee "$out/train_$dtype.txt"
done
"$py" main.py --dataset_file synthetic --device cuda --no_amp --epochs 1 --synthetic_train_size 1600 \
    --output_dir "$out/train_float32" --no_plots | tee "$out/train_float32.txt"
