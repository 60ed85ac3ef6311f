"""The reference side of bench/run_bench.py: the same measurement with diffusers.

    python bench/reference_diffusers.py unet|t2i MODEL_DIR [--threads N --iters N --warmup N
                                         --device cpu|cuda --dtype fp32|fp16 --steps N --size N --batch N]
Prints one JSON line with the same keys as build/bin/bench_sd.
"""
import argparse
import json
import time

import torch


def peak_rss_mb():
    # VmHWM, not getrusage: Linux carries ru_maxrss across exec.
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["unet", "unet-train", "t2i"])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    train = a.mode == "unet-train"
    with torch.inference_mode(not train):
        if a.mode in ("unet", "unet-train"):
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(a.model, torch_dtype=dtype).to(dev).train(train)
            sample = torch.randn(a.batch, unet.config.in_channels, a.size, a.size, dtype=dtype, device=dev)
            ctx = torch.randn(a.batch, 77, unet.config.cross_attention_dim, dtype=dtype, device=dev)
            t = torch.tensor(500, device=dev)
            target = torch.randn_like(sample)

            def run():
                y = unet(sample, t, encoder_hidden_states=ctx).sample
                if train:
                    torch.nn.functional.mse_loss(y, target).backward()
                    unet.zero_grad(set_to_none=True)
        else:
            from diffusers import DDIMScheduler, StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False).to(dev)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            run = lambda: pipe("a photograph of an astronaut riding a horse", num_inference_steps=a.steps,
                               height=512, width=512, output_type="np")
        for i in range(a.warmup + a.iters):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
    out = {"mode": a.mode, "threads": torch.get_num_threads(), "dtype": a.dtype, "device": str(dev),
           "times_s": times, "median_s": sorted(times)[len(times) // 2],
           "peak_rss_mb": peak_rss_mb()}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
