#!/usr/bin/env bash
# The toy world end to end, through the product (docs/toy-world.md):
#   1. the synthetic captioned dataset (train + held-out splits),
#   2. the teacher: `sdctl run examples/toy-teacher.yaml` (init -> train_vae -> finetune),
#   3. the probe classifier, with its accuracy on held-out real images,
#   4. `sdctl eval`: the teacher at 4 DDIM steps against itself at 50, CFG 7.5,
#      on held-out prompts -> output/toy-eval/{eval.json,grid.png}.
# Each step is skipped when its result exists; delete output/toy-* to redo it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/build.sh
B=build/bin
D=output/toy-data
[ -f $D/train/metadata.jsonl ] || $B/sdctl dataset synth --out $D/train --count 20000 --seed 0
[ -f $D/heldout/metadata.jsonl ] || $B/sdctl dataset synth --out $D/heldout --count 500 --seed 1 --split heldout

newest_teacher() { ls -d output/toy-teacher/runs/job-*/finetune 2>/dev/null | sort | tail -1; }
if [ -z "$(newest_teacher)" ]; then
  start=$(date +%s)
  $B/sdctl run examples/toy-teacher.yaml
  echo "teacher trained in $(( $(date +%s) - start )) s"
fi
TEACHER=$(newest_teacher)
# The distillation jobs (examples/toy-*distill.yaml) name the teacher by this link.
ln -sfn "${TEACHER#output/toy-teacher/}" output/toy-teacher/model

PROBE=output/toy-probe.safetensors
[ -f $PROBE ] || $B/sdctl probe train --data $D/train --heldout $D/heldout --out $PROBE --steps 1200

# Once per teacher (the scripts after this one call it first and need only the teacher).
[ -f output/toy-eval/eval.json ] && [ output/toy-eval/eval.json -nt "$TEACHER" ] && exit 0
$B/sdctl eval --model "$TEACHER" --steps 4 --reference "$TEACHER" --reference-steps 50 \
  --guidance 7.5 --prompts $D/heldout --count 100 --seeds-per-prompt 2 --probe $PROBE \
  --out output/toy-eval
