"""Peak memory of VAE tiling and VAE slicing at 1024x1024, against decoding whole, in one run:
the SD1.5 VAE configuration (random weights), fp32, this CPU; diffusers' AutoencoderKL with and
without enable_tiling()/enable_slicing() beside it. Every decode runs in its own process, so each
peak (VmHWM) is that decode's alone; the RSS before decoding (weights and latents loaded) is
recorded too, and `*_decode_mb` is the peak minus it, what the decode itself adds.

  .venv/bin/python bench/vae_memory_sd15.py [--size 1024] [--threads 2]
      -> bench/results/vae_tiling_sd15_<size>_cpu_peak_rss.json   (batch 1: tiled vs whole)
         bench/results/vae_slicing_sd15_<size>_b2_cpu_peak_rss.json (batch 2: sliced vs whole)
         (ours = our peak RSS with the option, reference = ours without, MB)
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import BENCH, ensure_models, write_result  # noqa: E402

DIFFUSERS = r'''
import json, sys, time, torch
from diffusers import AutoencoderKL
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return float(line.split()[1]) / 1024
torch.set_num_threads(int(sys.argv[4]))
vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
if "tiling" in sys.argv[3]: vae.enable_tiling()
if "slicing" in sys.argv[3]: vae.enable_slicing()
lat = int(sys.argv[2]) // 8
z = torch.randn(int(sys.argv[5]), 4, lat, lat, generator=torch.Generator().manual_seed(0))
before = status("VmRSS:")
t0 = time.perf_counter()
with torch.inference_mode():
    vae.decode(z)
print(json.dumps({"peak_rss_mb": status("VmHWM:"), "rss_before_mb": before, "seconds": time.perf_counter() - t0}))
'''


def ours(vae_dir, size, batch, threads, flags):
    cmd = [BENCH, "vae-decode", "--model", vae_dir, "--size", str(size // 8), "--batch", str(batch),
           "--threads", str(threads), "--iters", "1", "--warmup", "0", *flags]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": round(rec["peak_rss_mb"], 1), "rss_before_mb": round(rec["rss_before_mb"], 1),
            "decode_mb": round(rec["peak_rss_mb"] - rec["rss_before_mb"], 1), "seconds": round(rec["median_s"], 3)}


def theirs(vae_dir, size, batch, threads, options):
    r = subprocess.run([sys.executable, "-c", DIFFUSERS, vae_dir, str(size), options or "none", str(threads),
                        str(batch)], check=True, capture_output=True, text=True)
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": round(rec["peak_rss_mb"], 1), "rss_before_mb": round(rec["rss_before_mb"], 1),
            "decode_mb": round(rec["peak_rss_mb"] - rec["rss_before_mb"], 1), "seconds": round(rec["seconds"], 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    _, _, pipe_dir = ensure_models()
    vae_dir = os.path.join(pipe_dir, "vae")
    what = f"VAE decode of {a.size}x{a.size} (SD1.5 VAE config, random weights, fp32)"
    cmd = f"bench/vae_memory_sd15.py --size {a.size} --threads {a.threads}"

    whole, tiled = ours(vae_dir, a.size, 1, a.threads, []), ours(vae_dir, a.size, 1, a.threads, ["--vae-tiling"])
    d_whole, d_tiled = theirs(vae_dir, a.size, 1, a.threads, ""), theirs(vae_dir, a.size, 1, a.threads, "tiling")
    write_result(f"vae_tiling_sd15_{a.size}_cpu_peak_rss", tiled["peak_rss_mb"], whole["peak_rss_mb"], "MB",
                 what=what + ", batch 1", threads=a.threads, ours_tiled=tiled, ours_whole=whole,
                 decode_mb_ratio=round(tiled["decode_mb"] / whole["decode_mb"], 3),
                 diffusers_tiled=d_tiled, diffusers_whole=d_whole, command=cmd)

    whole2 = ours(vae_dir, a.size, 2, a.threads, [])
    sliced2 = ours(vae_dir, a.size, 2, a.threads, ["--vae-slicing"])
    both2 = ours(vae_dir, a.size, 2, a.threads, ["--vae-slicing", "--vae-tiling"])
    d_whole2, d_sliced2 = theirs(vae_dir, a.size, 2, a.threads, ""), theirs(vae_dir, a.size, 2, a.threads, "slicing")
    write_result(f"vae_slicing_sd15_{a.size}_b2_cpu_peak_rss", sliced2["peak_rss_mb"], whole2["peak_rss_mb"], "MB",
                 what=what + ", batch 2", threads=a.threads, ours_sliced=sliced2, ours_whole=whole2,
                 ours_sliced_and_tiled=both2, decode_mb_ratio=round(sliced2["decode_mb"] / whole2["decode_mb"], 3),
                 diffusers_sliced=d_sliced2, diffusers_whole=d_whole2, command=cmd)


if __name__ == "__main__":
    main()
