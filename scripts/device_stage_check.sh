#!/usr/bin/env bash
# GPU check of the finetune stage (run on a lent device machine; binaries built
# here and carried in .devcarry/ like scripts/device_bench.sh): the stage trains
# on CUDA in fp32 and with bf16 autocast, and the result samples on CUDA.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl
export PYTHONPATH=/tmp/site:tests/python PYTHONUNBUFFERED=1
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$PWD/.devcarry/lib:$TORCH_LIB:${LD_LIBRARY_PATH:-}"
python3 - <<'PY'
from sdtest.tiny_models import make_pipeline
from test_finetune_stage import make_dataset
make_pipeline("/tmp/tiny-sd"); make_dataset("/tmp/data")
for mp in ("no", "bf16"):
    open(f"/tmp/job_{mp}.yaml", "w").write(
        "model: /tmp/tiny-sd\ndataset: /tmp/data\nseed: 1\nbatch_size: 2\ncheckpoint_interval: 10\n"
        f"stages: [finetune]\nfinetune:\n  steps: 20\n  lr: 1.0e-4\n  lr_warmup_steps: 0\n  mixed_precision: {mp}\n")
PY
for mp in no bf16; do
  /usr/bin/time -f "$mp wall %es" .devcarry/bin/sd_probe stage --job /tmp/job_$mp.yaml --device cuda \
    --checkpoint-dir /tmp/ckpt_$mp --out /tmp/out_$mp | tail -2
done
python3 - <<'PY'
import numpy as np
from safetensors.numpy import load_file
t = load_file("/tmp/tiny-sd/unet/diffusion_pytorch_model.safetensors")
a = load_file("/tmp/out_no/unet/diffusion_pytorch_model.safetensors")
b = load_file("/tmp/out_bf16/unet/diffusion_pytorch_model.safetensors")
moved_a = max(float(np.abs(a[k] - t[k]).max()) for k in t)
moved_b = max(float(np.abs(b[k] - t[k]).max()) for k in t)
diff = max(float(np.abs(a[k] - b[k]).max()) for k in t)
finite = all(np.isfinite(b[k]).all() for k in b)
print(f"fp32 moved {moved_a:.2e}  bf16 moved {moved_b:.2e}  fp32-vs-bf16 max diff {diff:.2e}  bf16 finite {finite}")
PY
.devcarry/bin/sdctl generate --model /tmp/out_bf16 --prompt "a red square" --steps 4 --device cuda --dtype fp16 \
  --out "${OUT:-/tmp}/finetuned_bf16_cuda.png" 2>&1 | tail -1
