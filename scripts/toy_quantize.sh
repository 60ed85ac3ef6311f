#!/usr/bin/env bash
# Quantization on the toy world (docs/toy-world.md "Quantization"):
#   1. the toy world (scripts/toy_world.sh: dataset, teacher, probe),
#   2. `sdctl run examples/toy-quantize.yaml`: the FP16 folder and the calibrated
#      INT8 UNet (wall time in output/toy-quantize-eval/wall.json),
#   3. `sdctl eval` against the fp32 teacher, 50 DDIM steps, CFG 7.5, 100
#      held-out prompts x 2 seeds, of the FP16 folder and of the same folder with
#      its INT8 UNet (--unet int8) -> output/toy-quantize-eval/{fp16,int8}/,
#   4. bench/toy_quantize.py -> bench/results/toy_int8_accuracy.json.
# Each step is skipped when its result exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
E=output/toy-quantize-eval
. scripts/toy_lib.sh

run_job examples/toy-quantize.yaml output/toy-quantize quantize
QUANT=$(newest output/toy-quantize quantize)
ev fp16 "$QUANT" 50 --unet float
ev int8 "$QUANT" 50 --unet int8
python3 bench/toy_quantize.py "$QUANT"
