#!/usr/bin/env bash
# Text-encoder distillation on the toy world (docs/toy-world.md "CLIP distillation"):
#   1. the toy world (scripts/toy_world.sh: dataset, teacher, probe),
#   2. `sdctl run examples/toy-clip-distill.yaml`: the teacher's 2-layer text
#      encoder into a 1-layer student (wall time in output/toy-clip-eval/wall.json),
#   3. the same student shape without distillation (the teacher's last layer
#      alone, what the student starts from) as the baseline,
#   4. `sdctl eval` of the teacher's UNet with each encoder against the teacher,
#      50 DDIM steps, CFG 7.5, 100 held-out prompts x 2 seeds -> output/toy-clip-eval/<name>/,
#   5. bench/toy_clip_distill.py -> bench/results/toy_clip_distill.json (with the
#      UNet's cross-attention keys, and the full SD1.5 encoder's size and latency).
# Each step is skipped when its result exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/toy_world.sh >/dev/null
B=build/bin
D=output/toy-data
E=output/toy-clip-eval
PROBE=output/toy-probe.safetensors
TEACHER=output/toy-teacher/model  # scripts/toy_world.sh links the newest trained teacher here
mkdir -p $E
. .venv/bin/activate

STUDENT=$(ls -d output/toy-clip-distill/runs/job-*/clip_distillation 2>/dev/null | sort | tail -1 || true)
if [ -z "$STUDENT" ]; then
  start=$(date +%s)
  $B/sdctl run examples/toy-clip-distill.yaml
  echo "{\"toy-clip-distill\": $(( $(date +%s) - start ))}" > $E/wall.json
  STUDENT=$(ls -d output/toy-clip-distill/runs/job-*/clip_distillation | sort | tail -1)
fi
BASE=output/toy-clip-layer-dropped
[ -d $BASE ] || python3 bench/toy_clip_distill.py layer-dropped "$TEACHER" $BASE
ev() {  # name model
  [ -f "$E/$1/eval.json" ] && return 0
  $B/sdctl eval --model "$2" --steps 50 --reference "$TEACHER" --reference-steps 50 --guidance 7.5 \
    --prompts $D/heldout --count 100 --seeds-per-prompt 2 --probe $PROBE --out "$E/$1"
}
ev student "$STUDENT"
ev layer_dropped $BASE
python3 bench/toy_clip_distill.py report "$TEACHER" "$STUDENT" $BASE
