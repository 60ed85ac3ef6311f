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
scripts/toy_world.sh >/dev/null
B=build/bin
D=output/toy-data
E=output/toy-quantize-eval
PROBE=output/toy-probe.safetensors
TEACHER=output/toy-teacher/model  # scripts/toy_world.sh links the newest trained teacher here
mkdir -p $E
. .venv/bin/activate

QUANT=$(ls -d output/toy-quantize/runs/job-*/quantize 2>/dev/null | sort | tail -1 || true)
if [ -z "$QUANT" ]; then
  start=$(date +%s)
  $B/sdctl run examples/toy-quantize.yaml
  echo "{\"toy-quantize\": $(( $(date +%s) - start ))}" > $E/wall.json
  QUANT=$(ls -d output/toy-quantize/runs/job-*/quantize | sort | tail -1)
fi
ev() {  # name unet
  [ -f "$E/$1/eval.json" ] && return 0
  $B/sdctl eval --model "$QUANT" --unet "$2" --steps 50 --reference "$TEACHER" --reference-steps 50 \
    --guidance 7.5 --prompts $D/heldout --count 100 --seeds-per-prompt 2 --probe $PROBE --out "$E/$1"
}
ev fp16 float
ev int8 int8
python3 bench/toy_quantize.py "$QUANT"
