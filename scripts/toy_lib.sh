# Sourced by the scripts/toy_*.sh experiments after they set E (their eval folder):
# the toy world first, the shared paths, and the three steps every experiment repeats.
scripts/toy_world.sh >/dev/null
B=build/bin
D=output/toy-data
PROBE=output/toy-probe.safetensors
TEACHER=output/toy-teacher/model  # scripts/toy_world.sh links the newest trained teacher here
mkdir -p "$E"
. .venv/bin/activate

# The newest finished stage folder of a job output root.
newest() { ls -d "$1"/runs/job-*/"$2" 2>/dev/null | sort | tail -1; }
# Runs job file $1 unless output root $2 already holds stage $3; records its wall
# time in $E/wall.json under the root's name.
run_job() {
  if [ -z "$(newest "$2" "$3")" ]; then
    local start
    start=$(date +%s)
    $B/sdctl run "$1"
    python3 - "$E/wall.json" "$(basename "$2")" $(( $(date +%s) - start )) <<'PY'
import json, os, sys
path, name, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = json.load(open(path)) if os.path.exists(path) else {}
w[name] = secs
json.dump(w, open(path, "w"), indent=2)
PY
  fi
}
# sdctl eval of model $2 at $3 steps (further sdctl flags after) against the
# teacher at 50 DDIM steps, CFG 7.5, 100 held-out prompts x 2 seeds -> $E/$1/.
ev() {
  [ -f "$E/$1/eval.json" ] && return 0
  local name=$1 model=$2 steps=$3
  shift 3
  $B/sdctl eval --model "$model" --steps "$steps" --reference "$TEACHER" --reference-steps 50 \
    --guidance 7.5 --prompts $D/heldout --count 100 --seeds-per-prompt 2 --probe $PROBE \
    --out "$E/$name" "$@"
}
