#!/usr/bin/env bash
# GPU benchmark on a lent device machine (see docs/benchmarks.md). Expects, carried
# in .devcarry/: bin/ (bench_sd, sdctl built here against the same torch 2.11.0+cu130
# the device image has), lib/ (abseil, ICU, libpng from Debian) and whl/ (diffusers,
# importlib_metadata, open-clip-torch). Results go to $OUT/results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$PWD/.devcarry/lib:$TORCH_LIB:${LD_LIBRARY_PATH:-}"
export BUILD_DIR=.devcarry
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'
# Smoke: the CLI end to end on CUDA fp16 with the tiny model.
PYTHONPATH=/tmp/site:tests/python python3 -m sdtest.tiny_models /tmp/tiny-sd >/dev/null 2>&1
.devcarry/bin/sdctl generate --model /tmp/tiny-sd --prompt "a red circle" --steps 10 --device cuda --dtype fp16 \
  --out "$OUT/tiny_cuda_fp16.png" 2>&1 | tail -1
python3 bench/run_bench.py --device cuda --dtype fp16 --threads 16 --rounds 2 --iters 10 --steps "${STEPS:-50}" \
  --only "${ONLY:-unet,tiny,t2i,cuda-graphs}" --out "$OUT/results"
