#!/usr/bin/env bash
# Structured pruning on the toy world (docs/toy-world.md "Pruning"):
#   1. the toy world (scripts/toy_world.sh: dataset, teacher, probe),
#   2. `sdctl run examples/toy-prune.yaml`: prune (seed ratios) then the
#      knowledge-distillation fine-tune from the unpruned teacher,
#   3. the same job with `finetune.teacher: none` (the task loss alone, same
#      budget) as the baseline,
#   4. `sdctl eval` of the pruned-only, the KD-fine-tuned and the task-only models
#      against the teacher, 50 DDIM steps, CFG 7.5, 100 held-out prompts x 2 seeds
#      -> output/toy-prune-eval/<name>/,
#   5. bench/toy_prune.py -> bench/results/toy_prune_finetune_accuracy.json.
# Each step is skipped when its result exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
E=output/toy-prune-eval
. scripts/toy_lib.sh

run_dir_of() {  # yaml output-dir -> runs the job once, prints its run folder
  local run
  run=$(ls -d "$2"/runs/job-*/finetune 2>/dev/null | sort | tail -1 || true)
  if [ -z "$run" ]; then
    local start
    start=$(date +%s)
    $B/sdctl run "$1" >&2
    echo "{\"seconds\": $(( $(date +%s) - start ))}" > "$E/$(basename "$2").wall.json"
    run=$(ls -d "$2"/runs/job-*/finetune | sort | tail -1)
  fi
  dirname "$run"
}
KD=$(run_dir_of examples/toy-prune.yaml output/toy-prune)
sed -e 's/^name: toy-prune$/name: toy-prune-task-only/' \
    -e 's|^output: output/toy-prune$|output: output/toy-prune-task-only|' \
    -e 's/^finetune:$/finetune:\n  teacher: none/' examples/toy-prune.yaml > $E/toy-prune-task-only.yaml
TASK=$(run_dir_of $E/toy-prune-task-only.yaml output/toy-prune-task-only)

ev pruned "$KD/prune" 50
ev kd "$KD/finetune" 50
ev task_only "$TASK/finetune" 50
python3 bench/toy_prune.py "$KD" "$TASK"
