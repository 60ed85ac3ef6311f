#!/usr/bin/env bash
# Step and guidance distillation on the toy world (docs/toy-world.md "Distillation"):
#   1. the toy world (scripts/toy_world.sh: dataset, teacher, probe),
#   2. `sdctl run examples/toy-distill.yaml`: progressive distillation 50->25->12->6,
#      then CFG distillation of the 6-step student (wall time in wall.json),
#   3. the 3- and 4-step students (one more phase each from the 6-step one),
#      and with ATTENTION=w the same progressive job with attention_weight w,
#   4. `sdctl eval` of every student and of the teacher at the same step counts
#      (leading and trailing spacing) against the teacher at 50 DDIM steps,
#      CFG 7.5, 100 held-out prompts x 2 seeds -> output/toy-distill-eval/<name>/,
#   5. bench/toy_distill.py -> bench/results/toy_distill_6step_accuracy.json and
#      toy_cfg_distill_6step.json.
# Each step is skipped when its result exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
E=output/toy-distill-eval
. scripts/toy_lib.sh

# A copy of a model (hard links) whose DDIM scheduler uses spacing $3.
with_spacing() {
  [ -d "$2" ] && return 0
  cp -al "$(realpath "$1")" "$2"
  local cfg="$2/scheduler/scheduler_config.json"
  python3 - "$cfg" "$3" <<'PY'
import json, os, sys
path, spacing = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["timestep_spacing"] = spacing
os.remove(path)  # a hard link to the teacher's file: replace, never write through
json.dump(c, open(path, "w"), indent=2)
PY
}
# One more progressive phase from model $1: $2 -> $3 steps, into output root $4.
more_steps() {
  local job=$E/job-$3steps.yaml
  sed -e "s|^model: .*|model: $1|" -e "s|^output: .*|output: $4|" \
      -e "s|progressive_stages: .*|progressive_stages: [$2, $3]|" \
      -e "s|^stages: .*|stages: [progressive_distillation]|" examples/toy-distill.yaml > "$job"
  run_job "$job" "$4" progressive_distillation
}

run_job examples/toy-distill.yaml output/toy-distill cfg_distillation
PD=$(newest output/toy-distill progressive_distillation)
CFG=$(newest output/toy-distill cfg_distillation)
with_spacing $TEACHER output/toy-teacher-trailing trailing
with_spacing $TEACHER output/toy-teacher-leading leading
ev teacher6_leading output/toy-teacher-leading 6
ev teacher6_trailing output/toy-teacher-trailing 6
ev student6 "$PD" 6
ev cfg6 "$CFG" 6
# The raw weights of the last 6-step checkpoint against the EMA the stage writes.
RAW=output/toy-distill-raw6
if [ ! -d $RAW ]; then
  last=$(ls -d "$(dirname "$PD")"/checkpoints/progressive_distillation/phase-6steps/step-* | sort | tail -1)
  cp -al "$(realpath "$PD")" $RAW
  rm $RAW/unet/diffusion_pytorch_model.safetensors
  cp "$last/unet.safetensors" $RAW/unet/diffusion_pytorch_model.safetensors
fi
ev student6_raw $RAW 6
for k in 4 3; do
  more_steps "$PD" 6 $k output/toy-distill-$k
  ev student$k "$(newest output/toy-distill-$k progressive_distillation)" $k
  ev teacher${k}_trailing output/toy-teacher-trailing $k
done
if [ -n "${ATTENTION:-}" ]; then
  job=$E/job-attention.yaml
  sed -e "s|^output: .*|output: output/toy-distill-attention|" \
      -e "s|^  keep_phase_models: true.*|  attention_weight: $ATTENTION|" \
      -e "s|^stages: .*|stages: [progressive_distillation]|" examples/toy-distill.yaml > $job
  run_job $job output/toy-distill-attention progressive_distillation
  ev student6_attention "$(newest output/toy-distill-attention progressive_distillation)" 6
fi
if [ -n "${MENG:-}" ]; then
  # Meng et al.'s order: CFG distillation of the 50-step teacher, then progressive
  # distillation of the w-conditioned student at the same guidance scales.
  job=$E/job-meng-cfg.yaml
  sed -e "s|^output: .*|output: output/toy-distill-meng-cfg|" \
      -e "s|^stages: .*|stages: [cfg_distillation]|" examples/toy-distill.yaml > $job
  run_job $job output/toy-distill-meng-cfg cfg_distillation
  job=$E/job-meng-pd.yaml
  sed -e "s|^model: .*|model: $(newest output/toy-distill-meng-cfg cfg_distillation)|" \
      -e "s|^output: .*|output: output/toy-distill-meng|" \
      -e "s|^  keep_phase_models: true.*|  guidance_range: [2, 14]|" \
      -e "s|^stages: .*|stages: [progressive_distillation]|" examples/toy-distill.yaml > $job
  run_job $job output/toy-distill-meng progressive_distillation
  ev cfg6_meng_order "$(newest output/toy-distill-meng progressive_distillation)" 6
fi
. .venv/bin/activate
python3 bench/toy_distill.py
