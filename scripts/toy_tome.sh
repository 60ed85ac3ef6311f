#!/usr/bin/env bash
# Token merging on the toy world (docs/toy-world.md "Token merging"):
#   1. the toy world (scripts/toy_world.sh: dataset, teacher, probe),
#   2. `sdctl eval` of the teacher with ToMe against itself without, 50 DDIM steps,
#      CFG 7.5, 100 held-out prompts x 2 seeds, at ratio 0.5 on its highest-resolution
#      attention (max_downsample 2: the toy UNet's full-resolution blocks have no
#      attention, so tomesd's default of 1 would merge nothing), on every attention
#      (max_downsample 4) and at ratio 0.75 -> output/toy-tome-eval/<name>/,
#   3. bench/toy_tome.py -> bench/results/toy_tome_accuracy.json.
# Each step is skipped when its result exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
E=output/toy-tome-eval
. scripts/toy_lib.sh

ev r050_ds2 "$TEACHER" 50 --tome 0.5 --tome-max-downsample 2
ev r050_ds4 "$TEACHER" 50 --tome 0.5 --tome-max-downsample 4
ev r075_ds2 "$TEACHER" 50 --tome 0.75 --tome-max-downsample 2
python3 bench/toy_tome.py
