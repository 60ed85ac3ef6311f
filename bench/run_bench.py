"""Runs the C++ core and diffusers on the same models, same torch build and thread
count, alternating the two, and writes one JSON per metric to bench/results/.

    .venv/bin/python bench/run_bench.py [--device cpu|cuda] [--dtype fp32|fp16] [--threads N]
                                        [--rounds 2] [--only unet,tiny,t2i,toy-train,cuda-graphs] [--steps 4]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
MODELS = os.path.join(ROOT, "output", "bench-models")
BENCH = os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bin", "bench_sd")
REF = os.path.join(ROOT, "bench", "reference_diffusers.py")


def machine():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name(0)}"
    return desc


def write_result(name, ours, reference, unit, **extra):
    """bench/results/<name>.json: the keys every result has (ratio = ours / reference), then
    `extra`; prints and returns the record."""
    out = {"name": name, "ours": ours, "reference": reference, "unit": unit,
           "ratio": round(ours / reference, 4), "machine": machine(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
    path = os.path.join(ROOT, "bench", "results", f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(path, json.dumps(out, indent=2))
    return out


def timed_rounds(fn, rounds):
    """One warm-up call of fn, then the wall time of each of `rounds` calls."""
    import time

    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def median(ts):
    return sorted(ts)[len(ts) // 2]


def ensure_models():
    from sdtest.tiny_models import SD15_SCHEDULER, make_unet, write_clip_tokenizer
    from test_full_sd15 import SD15_UNET

    os.makedirs(MODELS, exist_ok=True)
    unet_dir = os.path.join(MODELS, "sd15-unet")
    if not os.path.exists(os.path.join(unet_dir, "config.json")):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        UNet2DConditionModel(**SD15_UNET).save_pretrained(unet_dir)
    tiny_dir = os.path.join(MODELS, "tiny-unet")
    if not os.path.exists(os.path.join(tiny_dir, "config.json")):
        make_unet().save_pretrained(tiny_dir)
    pipe_dir = os.path.join(MODELS, "sd15-random")
    if not os.path.exists(os.path.join(pipe_dir, "model_index.json")):
        import tempfile

        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                          projection_dim=768, eos_token_id=2))
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel.from_pretrained(unet_dir), vae=vae, text_encoder=te,
            tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(tempfile.mkdtemp())),
            scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(pipe_dir)
    return unet_dir, tiny_dir, pipe_dir


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(name, ours_cmd, ref_cmd, rounds):
    ours, ref = [], []
    for _ in range(rounds):  # alternate so that machine noise hits both sides alike
        ours.append(run(ours_cmd))
        ref.append(run(ref_cmd))
    o_t = statistics.median(t for r in ours for t in r["times_s"])
    r_t = statistics.median(t for r in ref for t in r["times_s"])
    records = [(name, o_t, r_t, "s")]
    records.append((name + "_peak_rss", max(r["peak_rss_mb"] for r in ours), max(r["peak_rss_mb"] for r in ref), "MiB"))
    if "peak_gpu_mb" in ours[0] and "peak_gpu_mb" in ref[0]:
        records.append((name + "_peak_gpu", max(r["peak_gpu_mb"] for r in ours),
                        max(r["peak_gpu_mb"] for r in ref), "MiB"))
    return records


def ensure_toy_unet():
    """Random weights in the toy teacher's UNet shape (examples/toy-sd/unet/config.json);
    returns the folder and the latent size."""
    from diffusers import UNet2DConditionModel

    toy_dir = os.path.join(MODELS, "toy-unet")
    config = json.load(open(os.path.join(ROOT, "examples", "toy-sd", "unet", "config.json")))
    saved = os.path.join(toy_dir, "config.json")
    if not os.path.exists(saved) or any(json.load(open(saved)).get(k) != v for k, v in config.items()):
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(config).save_pretrained(toy_dir)
    return toy_dir, str(config["sample_size"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="unet,tiny,t2i,toy-train")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    unet_dir, tiny_dir, pipe_dir = ensure_models()
    common = ["--threads", str(a.threads), "--device", a.device, "--dtype", a.dtype]
    py = [sys.executable, REF]
    suffix = f"{a.device}_{a.dtype}"
    records = []
    only = a.only.split(",")
    os.makedirs(a.out, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    written = 0

    def flush():  # write as we go, so a run cut short keeps what it measured
        nonlocal written
        for name, ours, ref, unit in records[written:]:
            rec = {"name": name, "ours": round(ours, 4), "reference": round(ref, 4), "unit": unit,
                   "ratio": round(ours / ref, 4), "machine": machine(), "torch": torch.__version__, "date": date,
                   "threads": a.threads, "command": " ".join(["bench/run_bench.py", *sys.argv[1:]])}
            with open(os.path.join(a.out, name + ".json"), "w") as f:
                json.dump(rec, f, indent=2)
            print(f"{name:45s} ours {ours:10.4f} {unit:4s} reference {ref:10.4f}  ratio {ours / ref:.3f}", flush=True)
        written = len(records)

    if "unet" in only:
        it = ["--iters", str(a.iters), "--warmup", "1"]
        records += compare(f"unet_sd15_64x64_b2_{suffix}", [BENCH, "unet", "--model", unet_dir, *common, *it],
                           [*py, "unet", unet_dir, *common, *it], a.rounds)
        flush()
    if "tiny" in only:
        it = ["--iters", "20", "--warmup", "3", "--size", "16"]
        records += compare(f"unet_tiny_16x16_b2_{suffix}", [BENCH, "unet", "--model", tiny_dir, *common, *it],
                           [*py, "unet", tiny_dir, *common, *it], a.rounds)
        flush()
    if "cuda-graphs" in only:
        # The UNet step captured once and replayed against the same step launched eagerly
        # (ours both), SD1.5 and the tiny UNet, where launch overhead is most of the step.
        # Off CUDA --cuda-graphs falls back to eager, so the ratio there is ~1 by design.
        for label, model, it in (("sd15_64x64", unet_dir, ["--iters", str(a.iters), "--warmup", "1"]),
                                 ("tiny_16x16", tiny_dir, ["--iters", "20", "--warmup", "3", "--size", "16"])):
            cmd = [BENCH, "unet", "--model", model, *common, *it]
            records += compare(f"cuda_graphs_unet_{label}_b2_{suffix}", [*cmd, "--cuda-graphs"], cmd, a.rounds)
        # the whole 512x512 text-to-image, --steps of them (the 50 on the GPU)
        cmd = [BENCH, "t2i", "--model", pipe_dir, *common, "--iters", "1", "--warmup", "1", "--steps", str(a.steps)]
        records += compare(f"cuda_graphs_t2i_sd15_512x512_ddim{a.steps}_cfg_{suffix}", [*cmd, "--cuda-graphs"], cmd,
                           a.rounds)
        flush()
    if "toy-train" in only:
        # One training step (forward + backward) of the toy teacher's UNet at its batch size.
        toy_dir, size = ensure_toy_unet()
        it = ["--iters", "5", "--warmup", "2", "--size", size, "--batch", "32"]
        records += compare(f"unet_train_toy_{size}x{size}_b32_{suffix}",
                           [BENCH, "unet-train", "--model", toy_dir, *common, *it],
                           [*py, "unet-train", toy_dir, *common, *it], a.rounds)
        flush()
    if "t2i" in only:
        it = ["--iters", "1", "--warmup", "1", "--steps", str(a.steps)]
        records += compare(f"t2i_sd15_512x512_ddim{a.steps}_cfg_{suffix}",
                           [BENCH, "t2i", "--model", pipe_dir, *common, *it],
                           [*py, "t2i", pipe_dir, *common, *it], a.rounds)
    flush()


if __name__ == "__main__":
    main()
