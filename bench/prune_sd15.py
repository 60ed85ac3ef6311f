"""Pruning the full SD1.5 configuration (random weights) at the seed's ratios: parameters,
MACs of one forward and C++ CPU latency per component, before and after, in one run.

  python3 bench/prune_sd15.py    -> bench/results/prune_sd15_unet_cpu.json
                                    (ours = pruned UNet step time, reference = unpruned;
                                    the text encoder and VAE decoder as extra keys)

Shapes are SD1.5's: the UNet at 64x64 latents (batch 2, a CFG step), the VAE decoder to
512x512 (batch 1), the text encoder at 77 tokens (batch 2). MACs are counted with
torch.utils.flop_counter on diffusers' modules loaded from each folder (FLOPs / 2).
"""
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from run_bench import BENCH, MODELS, write_result  # noqa: E402
from sdtest.tiny_models import write_sd15_random  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SDCTL = os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bin", "sdctl")
TOY = os.path.join(ROOT, "output", "toy-teacher", "model")  # tokenizer and scheduler only


def sd15_model():
    model = os.path.join(MODELS, "sd15-random")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        tmp = model + ".tmp"
        subprocess.run(["rm", "-rf", tmp], check=True)
        os.makedirs(tmp)
        write_sd15_random(tmp, TOY)
        os.rename(tmp, model)
    return model


def pruned(model):
    out_root = os.path.join(ROOT, "output", "bench-prune-sd15")
    runs = os.path.join(out_root, "runs")

    def done():
        return sorted(d for d in (os.listdir(runs) if os.path.isdir(runs) else [])
                      if os.path.exists(os.path.join(runs, d, "prune", "prune_report.json")))
    if not done():
        os.makedirs(out_root, exist_ok=True)
        job = os.path.join(out_root, "job.yaml")
        with open(job, "w") as f:
            f.write(f"name: bench-prune-sd15\nmodel: {model}\ndataset: {ROOT}/output/toy-data/train\n"
                    f"output: {out_root}\nstages: [prune]\n")
        subprocess.run([SDCTL, "run", job], check=True)
    return os.path.join(runs, done()[-1], "prune")


def latency(mode, folder, *flags, rounds=2):
    times = []
    for _ in range(rounds):
        r = subprocess.run([BENCH, mode, "--model", folder, "--iters", "2", "--threads", str(os.cpu_count()), *flags],
                           capture_output=True, text=True, check=True)
        times += json.loads(r.stdout.strip().splitlines()[-1])["times_s"]
    times.sort()
    return round(times[len(times) // 2], 4)


def macs(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops() // 2


def measure(model_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = {}
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    out["unet"] = {"parameters": sum(p.numel() for p in unet.parameters()),
                   "block_out_channels": list(unet.config.block_out_channels),
                   "macs_per_image": macs(lambda: unet(torch.randn(1, 4, 64, 64), torch.tensor(500),
                                                       encoder_hidden_states=torch.randn(1, 77, 768)))}
    del unet
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).eval()
    out["vae_decoder"] = {"parameters": sum(p.numel() for p in vae.decoder.parameters()),
                          "block_out_channels": list(vae.config.block_out_channels),
                          "macs_per_image": macs(lambda: vae.decode(torch.randn(1, 4, 64, 64)))}
    out["vae_encoder"] = {"parameters": sum(p.numel() for p in vae.encoder.parameters())}
    del vae
    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
    out["text_encoder"] = {"parameters": sum(p.numel() for p in te.parameters()),
                           "intermediate_size": te.config.intermediate_size,
                           "macs_per_prompt": macs(lambda: te(torch.randint(0, 49407, (1, 77))))}
    del te
    out["unet"]["step_s_batch2"] = latency("unet", os.path.join(model_dir, "unet"), "--batch", "2", "--size", "64")
    out["vae_decoder"]["decode_s_512"] = latency("vae-decode", os.path.join(model_dir, "vae"), "--size", "64")
    out["text_encoder"]["forward_s_batch2"] = latency("text-encoder", os.path.join(model_dir, "text_encoder"),
                                                      "--batch", "2")
    return out


def main():
    model = sd15_model()
    result = pruned(model)
    before, after = measure(model), measure(result)
    report = json.load(open(os.path.join(result, "prune_report.json")))["components"]
    ratios = {c: {k: round(after[c][k] / before[c][k], 4) for k in before[c]
                  if isinstance(before[c][k], (int, float))} for c in before}
    extra = {"command": "python3 bench/prune_sd15.py",
             "ratios_asked": {"unet": 0.3, "text_encoder": 0.25, "vae": 0.2},
             "before": before, "after": after, "after_over_before": ratios,
             "unet_time_embedding_refit": report["unet"]["time_embedding_refit"]}
    write_result("prune_sd15_unet_cpu", after["unet"]["step_s_batch2"], before["unet"]["step_s_batch2"],
                 "s per UNet step (batch 2, 64x64 latents, fp32, C++)", **extra)


if __name__ == "__main__":
    main()
