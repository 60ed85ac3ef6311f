"""Attention kernels: our UNet step on LibTorch's CPU flash kernel against the same step on its
math kernel (the unfused softmax(QK^T)V that forms every score matrix), time and peak memory,
per resolution: the full SD1.5 UNet configuration (random weights), batch 2, in one run.

  .venv/bin/python bench/sdpa_sd15.py [--resolutions 512,768] [--rounds 2] [--threads 2]
      -> bench/results/sdpa_flash_vs_math_sd15_cpu_<res>.json
         (ours = the step on --sdpa flash, reference = on --sdpa math; peak RSS of each and
          --sdpa auto's time as extra keys)
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import BENCH, ensure_models, write_result  # noqa: E402


def step(unet_dir, latent, threads, rounds, backend):
    cmd = [BENCH, "unet", "--model", unet_dir, "--batch", "2", "--size", str(latent), "--threads", str(threads),
           "--iters", str(rounds), "--warmup", "1", "--sdpa", backend]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolutions", default="512,768")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    unet_dir, _, _ = ensure_models()
    for res in [int(r) for r in a.resolutions.split(",")]:
        latent = res // 8
        flash = step(unet_dir, latent, a.threads, a.rounds, "flash")
        math = step(unet_dir, latent, a.threads, a.rounds, "math")
        auto = step(unet_dir, latent, a.threads, a.rounds, "auto")
        write_result(
            f"sdpa_flash_vs_math_sd15_cpu_{res}", round(flash["median_s"], 4), round(math["median_s"], 4), "s",
            threads=a.threads, resolution=res,
            what=f"one UNet forward, SD1.5 config (random weights), {latent}x{latent} latents, batch 2, fp32",
            ours_times_s=flash["times_s"], reference_times_s=math["times_s"],
            auto_s=round(auto["median_s"], 4),
            peak_rss_mb_flash=flash.get("peak_rss_mb"), peak_rss_mb_math=math.get("peak_rss_mb"),
            command=f"bench/sdpa_sd15.py --resolutions {res} --threads {a.threads} --rounds {a.rounds}")


if __name__ == "__main__":
    main()
