"""Our C++ UNet step against onnxruntime running the UNet we export, diffusers beside: the full SD1.5 UNet
configuration (random weights), 64x64 latents (512x512 images), batch 2 (one CFG step), on this
CPU, in one run. The graph comes from the export stage (C++ model code, IR 8 / opset 17).

  .venv/bin/python bench/onnx_sd15.py [--rounds 3] [--threads 2]
      -> bench/results/onnx_unet_sd15_cpu.json
         (ours = our C++ UNet's step time, reference = onnxruntime's on the exported
          unet.onnx; diffusers' time, the export's wall time and sizes, and onnxruntime's
          largest difference from diffusers as extra keys)
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import BENCH, MODELS, ensure_models, median, timed_rounds, write_result  # noqa: E402


def export(unet_dir):
    from test_finetune_stage import run_stage, write_stage_job

    src = os.path.join(MODELS, "sd15-unet-pipeline")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, f)
    link = os.path.join(src, "unet")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(unet_dir), link)
    work = os.path.join(MODELS, "onnx-export")
    out = os.path.join(work, "out")
    subprocess.run(["rm", "-rf", work], check=True)
    os.makedirs(work)
    job = write_stage_job(pathlib.Path(work), "onnx", src, "export", "  sharded: false\n", seed=0)
    t0 = time.perf_counter()
    run_stage(job, os.path.join(work, "ckpt"), out)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    unet_dir, _, _ = ensure_models()
    out, export_s = export(unet_dir)
    report = json.load(open(os.path.join(out, "export.json")))["onnx"]["models"]["unet"]

    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    sample, t, ctx = (torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0]),
                      torch.randn(2, 77, 768, generator=g))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(os.path.join(out, "onnx", "unet.onnx"), opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    feed = {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    got = {}

    def run_ort():
        got["ort"] = sess.run(None, feed)[0]

    ort_times = timed_rounds(run_ort, a.rounds)
    del sess

    ref = UNet2DConditionModel.from_pretrained(unet_dir).eval()

    def run_ref():
        with torch.inference_mode():
            got["ref"] = ref(sample, t, encoder_hidden_states=ctx).sample

    ref_times = timed_rounds(run_ref, a.rounds)
    err = (torch.from_numpy(got["ort"]) - got["ref"]).abs().max().item()
    del ref

    cmd = [BENCH, "unet", "--model", unet_dir, "--batch", "2", "--size", "64", "--threads", str(a.threads),
           "--iters", str(a.rounds), "--warmup", "1"]
    cpp = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    t_ort, t_ref = median(ort_times), median(ref_times)
    write_result(
        "onnx_unet_sd15_cpu", round(cpp["median_s"], 4), round(t_ort, 4), "s",
        threads=a.threads, onnxruntime=ort.__version__,
        what="one UNet forward, SD1.5 config (random weights), 64x64 latents, batch 2, fp32: our C++ UNet "
             "against onnxruntime CPU on our exported unet.onnx; diffusers beside",
        ours_times_s=cpp["times_s"], reference_times_s=[round(x, 4) for x in ort_times],
        diffusers_s=round(t_ref, 4), diffusers_times_s=[round(x, 4) for x in ref_times],
        onnxruntime_vs_diffusers=round(t_ort / t_ref, 4),
        ort_max_abs_diff_vs_diffusers=err,
        ort_session_load_s=round(load_s, 2), export_stage_wall_s=round(export_s, 1),
        onnx_model_bytes=report["model_bytes"], onnx_data_bytes=report["data_bytes"], onnx_nodes=report["nodes"],
        command=f"bench/onnx_sd15.py --rounds {a.rounds} --threads {a.threads}")


if __name__ == "__main__":
    main()
