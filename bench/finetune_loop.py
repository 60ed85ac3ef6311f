"""Does the C++ `finetune` loop learn as fast as diffusers' would? Trains the toy
teacher's UNet from the same random weights for the same number of steps twice —
once through the product (`sdctl run`, a finetune-only job) and once with the
loop of diffusers' train_text_to_image (AdamW, warm-up, gradient clipping, 10%
caption dropout, v-prediction, frozen text encoder, no EMA) — and scores both on
the same held-out latents, noise and timesteps. Writes the held-out v-MSE and
the wall time of each to bench/results/.

    .venv/bin/python bench/finetune_loop.py [--steps 600] [--data output/toy-data/train]
                                            [--heldout output/toy-data/heldout] [--model DIR]

--model: a diffusers folder with a trained VAE (e.g. a train_vae stage's output);
by default one is made once with `sdctl run` (init + a 300-step train_vae).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_bench import MODELS, machine  # noqa: E402

SDCTL = os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bin", "sdctl")
TIMESTEPS = (50, 100, 200, 300, 500, 700, 900)


def sdctl_run(job, workdir):
    path = os.path.join(workdir, job["name"] + ".yaml")
    with open(path, "w") as f:
        json.dump(job, f)  # JSON is YAML
    start = time.time()
    r = subprocess.run([SDCTL, "run", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sdctl run {path} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.time() - start


def ensure_vae_model(data):
    out = os.path.join(MODELS, "toy-vae")
    model = os.path.join(out, "runs", "job-000001", "train_vae")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        os.makedirs(out, exist_ok=True)
        sdctl_run({"name": "toy-vae", "model": os.path.join(ROOT, "examples", "toy-sd"), "dataset": data,
                   "output": out, "seed": 0, "stages": ["init", "train_vae"],
                   "train_vae": {"steps": 300, "lr": 2e-3, "lr_scheduler": "cosine", "batch_size": 16,
                                 "foreground_weight": 20}}, out)
    return model


def pixels(folder, lines):
    """The images of metadata lines, [N, 3, H, W] in [-1, 1]."""
    x = np.stack([np.array(Image.open(os.path.join(folder, l["file_name"])).convert("RGB")) for l in lines])
    return torch.tensor(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_pipe(model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def reference_loop(model, data, out, steps, batch, lr, warmup):
    torch.manual_seed(0)
    pipe = load_pipe(model)
    sch, unet, vae, te, tok = pipe.scheduler, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    lines = [json.loads(l) for l in open(os.path.join(data, "metadata.jsonl"))]
    cache = {}

    def latent(i):  # encoded once, as finetune.cache_latents does
        if i not in cache:
            with torch.no_grad():
                cache[i] = vae.encode(pixels(data, lines[i:i + 1])).latent_dist.mean[0] * vae.config.scaling_factor
        return cache[i]

    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    unet.train()
    start = time.time()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = torch.randint(0, len(lines), (batch,), generator=g).tolist()
        z = torch.stack([latent(i) for i in idx])
        caps = [lines[i]["text"] if torch.rand(1, generator=g).item() >= 0.1 else "" for i in idx]
        with torch.no_grad():
            ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            ctx = te(ids)[0]
        t = torch.randint(0, sch.config.num_train_timesteps, (batch,), generator=g)
        n = torch.randn(z.shape, generator=g)
        loss = torch.nn.functional.mse_loss(unet(sch.add_noise(z, n, t), t, ctx).sample, sch.get_velocity(z, n, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    seconds = time.time() - start
    unet.save_pretrained(out)
    return seconds


def heldout_vmse(model, heldout, unet_dirs, count=64):
    from diffusers import UNet2DConditionModel

    pipe = load_pipe(model)
    sch, vae, te, tok = pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer
    lines = [json.loads(l) for l in open(os.path.join(heldout, "metadata.jsonl"))][:count]
    out = []
    with torch.no_grad():
        z = vae.encode(pixels(heldout, lines)).latent_dist.mean * vae.config.scaling_factor
        ids = tok([l["text"] for l in lines], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        ctx = te(ids)[0]
        for d in unet_dirs:
            unet = UNet2DConditionModel.from_pretrained(d).eval()
            per_t = []
            for t in TIMESTEPS:
                n = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
                tt = torch.full((len(lines),), t)
                pred = unet(sch.add_noise(z, n, tt), tt, ctx).sample
                per_t.append(torch.nn.functional.mse_loss(pred, sch.get_velocity(z, n, tt)).item())
            out.append(per_t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--data", default=os.path.join(ROOT, "output", "toy-data", "train"))
    ap.add_argument("--heldout", default=os.path.join(ROOT, "output", "toy-data", "heldout"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    model = a.model or ensure_vae_model(a.data)
    work = tempfile.mkdtemp(prefix="finetune-loop-")
    ours_s = sdctl_run({"name": "loop", "model": model, "dataset": a.data, "output": work, "seed": 0,
                        "batch_size": a.batch, "checkpoint_interval": 100000, "data": {"caption_dropout": 0.1},
                        "finetune": {"steps": a.steps, "lr": a.lr, "lr_scheduler": "constant",
                                     "lr_warmup_steps": a.warmup, "cache_latents": True},
                        "stages": ["finetune"]}, work)
    ours_unet = os.path.join(work, "runs", "job-000001", "finetune", "unet")
    ref_unet = os.path.join(work, "reference-unet")
    ref_s = reference_loop(model, a.data, ref_unet, a.steps, a.batch, a.lr, a.warmup)
    start, ours, ref = heldout_vmse(model, a.heldout, [os.path.join(model, "unet"), ours_unet, ref_unet])
    print("held-out v-MSE at t =", TIMESTEPS)
    for label, row in (("start", start), ("ours", ours), ("reference", ref)):
        print(f"  {label:10s}", " ".join(f"{v:.4f}" for v in row), f"mean {np.mean(row):.4f}")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    name = f"finetune_loop_toy_{a.steps}steps_b{a.batch}"
    os.makedirs(a.out, exist_ok=True)
    for suffix, o, r, unit, extra in (
            ("heldout_vmse", float(np.mean(ours)), float(np.mean(ref)), "v-MSE",
             {"timesteps": TIMESTEPS, "ours_per_t": ours, "reference_per_t": ref, "start_per_t": start}),
            # Ours includes process start, the coordinator and encoding the latents it caches.
            ("wall", ours_s, ref_s, "s", {})):
        rec = {"name": f"{name}_{suffix}", "ours": round(o, 4), "reference": round(r, 4), "unit": unit,
               "ratio": round(o / r, 4), "machine": machine(), "torch": torch.__version__, "date": date,
               "threads": os.cpu_count(), "command": " ".join(["bench/finetune_loop.py", *sys.argv[1:]]), **extra}
        with open(os.path.join(a.out, rec["name"] + ".json"), "w") as f:
            json.dump(rec, f, indent=2)
        print(f"{rec['name']:45s} ours {o:10.4f} {unit:5s} reference {r:10.4f}  ratio {o / r:.3f}")


if __name__ == "__main__":
    main()
