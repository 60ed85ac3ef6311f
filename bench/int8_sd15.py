"""INT8 UNet against its fp32 self: the full SD1.5 configuration (random weights), 64x64
latents, batch 2 (one CFG step), on this CPU, in one run; beside it the seed's method
(torch.ao quantize_dynamic over Linear and Conv2d) and today's PyTorch method (torchao's
int8 dynamic-activation int8-weight config) on the same diffusers UNet.

  .venv/bin/python bench/int8_sd15.py [--threads 2] [--rounds 3]
      -> bench/results/int8_unet_sd15_cpu.json
         (ours = our INT8 step time, reference = our fp32 step time; every other
          method's time and every output's error against its own fp32 as extra keys)

Error is the relative L2 distance of a method's UNet output from the fp32 output of the
same implementation, on the same fixed inputs (sample, timestep 500, context).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import BENCH, ensure_models, median, timed_rounds, write_result  # noqa: E402


def ours(unet_dir, io, out, threads, rounds, int8, convolutions=True):
    cmd = [BENCH, "unet", "--model", unet_dir, "--batch", "2", "--size", "64", "--threads",
           str(threads), "--iters", str(rounds), "--warmup", "1", "--io", io, "--save-output", out]
    if int8:
        cmd += ["--int8", "1", "--calibration-inputs", "4", "--clipping", "mse",
                "--int8-convolutions", "1" if convolutions else "0"]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    from safetensors.torch import load_file
    return rec, load_file(out)["out"]


def timed(fn, rounds):
    return median(timed_rounds(fn, rounds))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    unet_dir, _, _ = ensure_models()
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 64, 64, generator=g),
              "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(2, 77, 768, generator=g)}
    tmp = tempfile.mkdtemp()
    io = os.path.join(tmp, "io.safetensors")
    from safetensors.torch import save_file
    save_file(inputs, io)

    fp32_rec, fp32_out = ours(unet_dir, io, os.path.join(tmp, "fp32.safetensors"), a.threads,
                              a.rounds, False)
    int8_rec, int8_out = ours(unet_dir, io, os.path.join(tmp, "int8.safetensors"), a.threads,
                              a.rounds, True)
    # The scope quantize_dynamic and torchao quantize: Linear layers only.
    lin_rec, lin_out = ours(unet_dir, io, os.path.join(tmp, "int8_linear.safetensors"),
                            a.threads, a.rounds, True, convolutions=False)
    t_fp32, t_int8, t_lin = fp32_rec["median_s"], int8_rec["median_s"], lin_rec["median_s"]

    from diffusers import UNet2DConditionModel
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

    def run(m):
        with torch.inference_mode():
            return m(*args).sample

    ref = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    ref_out = run(ref)
    t_ref = timed(lambda: run(ref), a.rounds)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qd = torch.ao.quantization.quantize_dynamic(
            UNet2DConditionModel.from_pretrained(unet_dir).eval(),
            {torch.nn.Linear, torch.nn.Conv2d}, dtype=torch.qint8)
    qd_out = run(qd)
    t_qd = timed(lambda: run(qd), a.rounds)
    del qd

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    ao = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    ao_out = run(ao)
    t_ao = timed(lambda: run(ao), a.rounds)
    del ao

    write_result(
        "int8_unet_sd15_cpu", round(t_int8, 4), round(t_fp32, 4), "s",
        threads=a.threads,
        what="one UNet forward, SD1.5 config (random weights), 64x64 latents, batch 2",
        ours_error=round(rel_err(int8_out, fp32_out), 5),
        # This 2-core machine is shared: rounds vary by up to 30%, the minimum is the
        # least disturbed, so its ratio is kept beside the medians'.
        ours_times_s=int8_rec["times_s"], reference_times_s=fp32_rec["times_s"],
        ratio_of_minimums=round(min(int8_rec["times_s"]) / min(fp32_rec["times_s"]), 3),
        ours_linear_only_times_s=lin_rec["times_s"],
        int8_convolutions=int8_rec.get("int8_convolutions"),
        int8_linears=int8_rec.get("int8_linears"),
        float_layers=int8_rec.get("float_layers"),
        clipping=int8_rec.get("clipping"),
        ours_linear_only_s=round(t_lin, 4),
        ours_linear_only_ratio=round(t_lin / t_fp32, 3),
        ours_linear_only_error=round(rel_err(lin_out, fp32_out), 5),
        ours_linear_only_int8_linears=lin_rec.get("int8_linears"),
        quantize_dynamic_ratio_to_ours_linear_only=round(t_qd / t_lin, 3),
        torchao_ratio_to_ours_linear_only=round(t_ao / t_lin, 3),
        diffusers_fp32_s=round(t_ref, 4),
        quantize_dynamic_s=round(t_qd, 4),
        quantize_dynamic_error=round(rel_err(qd_out, ref_out), 5),
        quantize_dynamic_ratio_to_ours=round(t_qd / t_int8, 3),
        torchao_int8_dynamic_s=round(t_ao, 4),
        torchao_int8_dynamic_error=round(rel_err(ao_out, ref_out), 5),
        torchao_ratio_to_ours=round(t_ao / t_int8, 3),
        our_fp32_vs_diffusers_error=round(rel_err(fp32_out, ref_out), 6),
        error_metric="relative L2 distance from the same implementation's fp32 output",
        command="bench/int8_sd15.py --threads %d --rounds %d" % (a.threads, a.rounds))


if __name__ == "__main__":
    main()
