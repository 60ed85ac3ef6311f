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
E=output/toy-clip-eval
. scripts/toy_lib.sh

run_job examples/toy-clip-distill.yaml output/toy-clip-distill clip_distillation
STUDENT=$(newest output/toy-clip-distill clip_distillation)
BASE=output/toy-clip-layer-dropped
[ -d $BASE ] || python3 bench/toy_clip_distill.py layer-dropped "$TEACHER" $BASE
ev student "$STUDENT" 50
ev layer_dropped $BASE 50
python3 bench/toy_clip_distill.py report "$TEACHER" "$STUDENT" $BASE
