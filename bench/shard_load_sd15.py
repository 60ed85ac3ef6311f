"""What loading the UNet costs in memory: the full SD1.5 UNet configuration (random weights,
fp32, 3.4 GB) from one safetensors file and from the export stage's shards, each load in a
process of its own; ours (C++ loader, copying and zero-copy) beside diffusers' from_pretrained.

  .venv/bin/python bench/shard_load_sd15.py [--max-shard-mb 500]
      -> bench/results/unet_sd15_load_sharded_peak_rss.json
         (ours = the peak RSS our loader adds loading the shards, reference = what
          diffusers' from_pretrained adds loading the same shards; every other
          combination as extra keys)

"Adds" is the process's VmHWM after the load minus its VmRSS before it (libraries loaded),
so the interpreter and LibTorch do not count. The weights themselves are 3.4 GB: an
ideal loader adds that and no more.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import BENCH, MODELS, ensure_models, write_result  # noqa: E402

DIFFUSERS_LOAD = r"""
import json, sys
import torch, diffusers
def status(key):
    return next(float(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS:")
unet = diffusers.UNet2DConditionModel.from_pretrained(sys.argv[1])
s = sum(p.sum().item() for p in unet.parameters())
print(json.dumps({"rss_before_mb": before, "peak_rss_mb": status("VmHWM:"), "checksum": s}))
"""


def ours(model, copy):
    r = subprocess.run([BENCH, "unet-load", "--model", model, "--copy", "1" if copy else "0", "--threads", "2"],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def diffusers(model):
    r = subprocess.run([sys.executable, "-c", DIFFUSERS_LOAD, model], check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def sharded_copy(unet_dir, max_shard_mb):
    """The export stage's shards of the UNet (export/sharded/)."""
    from test_finetune_stage import run_stage, write_stage_job

    src = os.path.join(MODELS, "sd15-unet-pipeline")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, f)
    if not os.path.exists(os.path.join(src, "unet")):
        os.symlink(os.path.abspath(unet_dir), os.path.join(src, "unet"))
    work = os.path.join(MODELS, "shard-export")
    subprocess.run(["rm", "-rf", work], check=True)
    os.makedirs(work)
    job = write_stage_job(pathlib.Path(work), "shards", src, "export",
                          f"  onnx: false\n  max_shard_mb: {max_shard_mb}\n", seed=0)
    run_stage(job, os.path.join(work, "ckpt"), os.path.join(work, "out"))
    return os.path.join(work, "out", "sharded")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-shard-mb", type=int, default=500)
    a = ap.parse_args()
    unet_dir, _, _ = ensure_models()
    shards = sharded_copy(unet_dir, a.max_shard_mb)
    rows = {}
    for layout, d in (("single", unet_dir), ("sharded", shards)):
        rows[f"ours_copy_{layout}"] = ours(d, True)
        rows[f"ours_zero_copy_{layout}"] = ours(d, False)
        rows[f"diffusers_{layout}"] = diffusers(d)
    sums = {k: round(v["checksum"], 1) for k, v in rows.items()}
    assert len(set(sums.values())) == 1, sums  # every loader read the same weights
    added = {k: round(v["peak_rss_mb"] - v["rss_before_mb"], 1) for k, v in rows.items()}
    weights = rows["ours_copy_single"]["weight_mb"]
    n_shards = len([f for f in os.listdir(shards) if f.startswith("unet_shard_")])
    write_result(
        "unet_sd15_load_sharded_peak_rss", added["ours_copy_sharded"], added["diffusers_sharded"], "MiB",
        what="memory a UNet load adds (VmHWM after minus VmRSS before), SD1.5 config fp32, one process each",
        weights_mb=round(weights, 1), shards=n_shards, max_shard_mb=a.max_shard_mb,
        added_mb=added, load_s={k: v["times_s"][0] for k, v in rows.items() if "times_s" in v},
        command=f"bench/shard_load_sd15.py --max-shard-mb {a.max_shard_mb}")


if __name__ == "__main__":
    main()
