#!/usr/bin/env bash
# The main job: generate an image with the model folder you name (diffusers SD1.5
# layout), or with the tiny random test model when you name none.
#   scripts/quickstart.sh [MODEL_DIR] [extra sdctl generate flags...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/build.sh
MODEL=${1:-}
[ $# -gt 0 ] && shift
mkdir -p output
if [ -z "$MODEL" ]; then
  MODEL=output/tiny-sd
  PYTHONPATH=tests/python .venv/bin/python -m sdtest.tiny_models "$MODEL" >/dev/null 2>&1
  echo "no model named: using the tiny random test model in $MODEL (its image is noise by design)"
fi
build/bin/sdctl generate --model "$MODEL" \
  --prompt "a photograph of an astronaut riding a horse" --negative-prompt "blurry, low quality" \
  --steps 25 --guidance 7.5 --seed 42 --scheduler default --out output/quickstart.png "$@"
