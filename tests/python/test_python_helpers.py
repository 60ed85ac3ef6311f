"""The quantize stage's Python helpers (quant/tome_utils.py, quant/compile_utils.py): written into
the stage's folder, and the pipeline README's usage examples run as written against it."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from test_quantize import quantize

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HELPERS = ("tome_utils.py", "compile_utils.py")

# The seed's examples (SD15_PIPELINE.md "With torch.compile" and "With Token Merging") verbatim,
# with checks around them; run from a directory holding output/quant as the README assumes.
SCRIPT = r'''
import json, sys
import numpy as np
import torch

# --- "With torch.compile", as written
from output.quant.compile_utils import load_compiled_pipeline

pipe = load_compiled_pipeline("./output/quant")
image = pipe("a cat", num_inference_steps=4).images[0]
# ---
compiled = type(pipe.unet).__name__
torch.manual_seed(0)
a = np.asarray(pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0])

from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("./output/quant", torch_dtype=torch.float32, safety_checker=None)
eager = np.asarray(pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0])

import tomesd.merge
calls = []
real = tomesd.merge.bipartite_soft_matching_random2d
def counting(metric, *args, **kw):
    calls.append(tuple(metric.shape))
    return real(metric, *args, **kw)
tomesd.merge.bipartite_soft_matching_random2d = counting

# --- "With Token Merging", as written
from output.quant.tome_utils import apply_tome_to_attention

# Apply ToMe to attention layers
for name, module in pipe.unet.named_modules():
    if 'attn' in name:
        apply_tome_to_attention(module, ratio=0.5)
# ---
unet_calls = []
counter = pipe.unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))
merged = np.asarray(pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0])
counter.remove()
patched = sum(hasattr(m, "_tome_original_forward") for m in pipe.unet.modules())
merge_calls = list(calls)

from output.quant.tome_utils import apply_tome, remove_tome_from_attention
for m in pipe.unet.modules():
    remove_tome_from_attention(m)
restored = np.asarray(pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0])
apply_tome(pipe, ratio=0.5)
torch.manual_seed(0)
block_level = np.asarray(pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0])

d = lambda x, y: int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())
print(json.dumps({"compiled": compiled, "image_size": list(image.size), "compiled_vs_eager": d(a, eager),
                  "patched": patched, "merge_calls": merge_calls, "unet_calls": len(unet_calls), "merged_vs_eager": d(merged, eager),
                  "restored_vs_eager": d(restored, eager), "block_level_vs_eager": d(block_level, eager),
                  "attention_vs_block_level": d(merged, block_level)}))
'''


def test_quantize_writes_the_helpers_and_the_readme_examples_run(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    out = quantize(tmp_path, model_dir, "  dtype: fp16\n  int8: false\n")
    for f in HELPERS:
        assert open(os.path.join(out, f)).read() == open(os.path.join(ROOT, "stages", "quantize", "python", f)).read()
    assert json.load(open(os.path.join(out, "quantization.json")))["python_helpers"] == list(HELPERS)

    work = tmp_path / "user"
    shutil.copytree(out, work / "output" / "quant")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=work, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["compiled"] == "OptimizedModule"  # torch.compile did wrap the UNet
    assert res["image_size"] == [32, 32]  # the tiny model's native size
    assert res["compiled_vs_eager"] <= 1  # compiling changes the speed, not the picture
    # The tiny UNet has 6 self-attention modules (2 down, 1 mid, 3 up); the loop patches those
    # and nothing else, and merging happens at full resolution only (max_downsample 1): 5 of
    # them, once per UNet call, on the CFG batch of 2 x 256 tokens.
    assert res["patched"] == 6
    assert res["unet_calls"] >= 4
    assert len(res["merge_calls"]) == 5 * res["unet_calls"]
    assert set(map(tuple, res["merge_calls"])) == {(2, 256, 32)}
    assert res["merged_vs_eager"] > 1  # it changed the image...
    assert res["restored_vs_eager"] == 0  # ...and removing it restores the model exactly
    assert res["block_level_vs_eager"] > 1
