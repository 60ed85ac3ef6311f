"""Token merging against no merging, per resolution: the full SD1.5 UNet configuration (random
weights), batch 2 (one CFG step), on this CPU, in one run; beside it diffusers' UNet with and
without the tomesd package at the same ratio.

  .venv/bin/python bench/tome_sd15.py [--resolutions 512,768,1024] [--ratio 0.5] [--rounds 2]
      -> bench/results/tome_sd15_cpu_<res>.json
         (ours = our ToMe step time, reference = our step time without ToMe;
          tomesd's times and ratio as extra keys)

Both implementations use fused attention (LibTorch's SDPA, which on CPU is a flash kernel), the
setting under which tomesd's authors and diffusers' docs report ToMe's gain to shrink at 512.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import BENCH, ensure_models, median, timed_rounds, write_result  # noqa: E402


def ours(unet_dir, latent, threads, rounds, tome=None):
    cmd = [BENCH, "unet", "--model", unet_dir, "--batch", "2", "--size", str(latent), "--threads", str(threads),
           "--iters", str(rounds), "--warmup", "1"]
    if tome:
        cmd += ["--tome", str(tome)]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolutions", default="512,768,1024")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    unet_dir, _, _ = ensure_models()
    import tomesd
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    for res in [int(r) for r in a.resolutions.split(",")]:
        latent = res // 8
        plain = ours(unet_dir, latent, a.threads, a.rounds)
        merged = ours(unet_dir, latent, a.threads, a.rounds, tome=a.ratio)

        g = torch.Generator().manual_seed(0)
        args = (torch.randn(2, 4, latent, latent, generator=g), torch.tensor([500.0]),
                torch.randn(2, 77, 768, generator=g))

        def run():
            with torch.inference_mode():
                ref(*args)

        d_plain = timed_rounds(run, a.rounds)
        tomesd.apply_patch(ref, ratio=a.ratio)
        d_tome = timed_rounds(run, a.rounds)
        tomesd.remove_patch(ref)

        t_plain, t_tome = plain["median_s"], merged["median_s"]
        write_result(
            f"tome_sd15_cpu_{res}", round(t_tome, 4), round(t_plain, 4), "s",
            threads=a.threads, resolution=res, ratio_tome=a.ratio,
            what=f"one UNet forward, SD1.5 config (random weights), {latent}x{latent} latents, batch 2",
            ours_times_s=merged["times_s"], reference_times_s=plain["times_s"],
            speedup=round(t_plain / t_tome, 3),
            tomesd_s=round(median(d_tome), 4), diffusers_s=round(median(d_plain), 4),
            tomesd_times_s=[round(t, 4) for t in d_tome], diffusers_times_s=[round(t, 4) for t in d_plain],
            tomesd_speedup=round(median(d_plain) / median(d_tome), 3),
            ours_tome_vs_tomesd=round(t_tome / median(d_tome), 3),
            peak_rss_mb_tome=merged.get("peak_rss_mb"), peak_rss_mb_plain=plain.get("peak_rss_mb"),
            command=f"bench/tome_sd15.py --resolutions {res} --ratio {a.ratio} --threads {a.threads} "
                    f"--rounds {a.rounds}")


if __name__ == "__main__":
    main()
