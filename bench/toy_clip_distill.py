"""Text-encoder distillation results (scripts/toy_clip_distill.sh).

  layer-dropped TEACHER OUT   the teacher with its text encoder cut to the student's
                              layers, untrained (what the student starts from)
  report TEACHER STUDENT BASE bench/results/toy_clip_distill.json: ours = shape accuracy
                              with the student encoder, reference = with the teacher's
                              (sdctl eval reports in output/toy-clip-eval/), PSNR to the
                              teacher's images, parameters, how far the UNet's
                              cross-attention keys move, and the full SD1.5 text
                              encoder's size and latency before/after (random weights,
                              the stage itself run on it for a few steps).
"""
import json
import math
import os
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from run_bench import BENCH, MODELS, write_result  # noqa: E402
from sdtest.tiny_models import SD15_CLIP, write_layer_dropped  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EVAL = os.path.join(ROOT, "output", "toy-clip-eval")
SDCTL = os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bin", "sdctl")


def link_copy(src, dst):
    shutil.copytree(os.path.realpath(src), dst, copy_function=os.link)


def default_map(layers):
    """The stage's default: half the layers, rounded up, spread evenly with the last on the last."""
    n = (layers + 1) // 2
    return [(k + 1) * layers // n - 1 for k in range(n)]


def layer_dropped(teacher, out):
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    link_copy(teacher, tmp)
    te = os.path.join(tmp, "text_encoder")
    layers = json.load(open(os.path.join(te, "config.json")))["num_hidden_layers"]
    shutil.rmtree(te)
    write_layer_dropped(os.path.join(os.path.realpath(teacher), "text_encoder"), default_map(layers), te)
    os.rename(tmp, out)


def cross_attention_keys(teacher, encoders, prompts):
    """Per encoder, the relative error of every attn2.to_k output of the teacher's UNet
    (what the cross-attention reads of the text) against the teacher encoder's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(teacher, "tokenizer"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(teacher, "unet"))
    to_k = [m.to_k for n, m in unet.named_modules() if n.endswith("attn2")]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    def keys(model_dir):
        with torch.no_grad():
            h = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"))(ids).last_hidden_state
            return h, [k(h) for k in to_k]

    h_t, k_t = keys(teacher)
    out = {}
    for name, d in encoders.items():
        h, k = keys(d)
        out[name] = {
            "keys_relative_error": round(float(sum(((a - b).norm() / b.norm()) for a, b in zip(k, k_t)) / len(k)), 5),
            "hidden_relative_error": round(float((h - h_t).norm() / h_t.norm()), 5)}
    return out


def parameters(model_dir):
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "text_encoder", "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("position_ids"))


def latency(text_encoder_dir, rounds=3):
    """The C++ encoder (bench_sd text-encoder), batch 2 (a CFG step's cond + uncond)."""
    runs = []
    for _ in range(rounds):
        r = subprocess.run([BENCH, "text-encoder", "--model", text_encoder_dir, "--batch", "2", "--iters", "5",
                            "--threads", str(os.cpu_count())], capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    times = sorted(t for r in runs for t in r["times_s"])
    return {"median_s": round(times[len(times) // 2], 5), "parameters": runs[0]["parameters"],
            "layers": runs[0]["layers"]}


def full_sd15(teacher):
    """The stage at full SD1.5 text-encoder size: random CLIP ViT-L/14 text weights in the
    toy teacher's folder (the stage reads only the text encoder and tokenizer), 2 steps."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = os.path.join(MODELS, "sd15-text-encoder")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        tmp = model + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        link_copy(teacher, tmp)
        shutil.rmtree(os.path.join(tmp, "text_encoder"))
        torch.manual_seed(0)
        CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).save_pretrained(os.path.join(tmp, "text_encoder"))
        os.rename(tmp, model)
    out_root = os.path.join(ROOT, "output", "bench-clip-distill-sd15")
    job = os.path.join(EVAL, "job-sd15-text-encoder.yaml")
    with open(job, "w") as f:
        f.write(f"name: bench-clip-distill-sd15\nmodel: {model}\ndataset: {ROOT}/output/toy-data/train\n"
                f"output: {out_root}\nbatch_size: 2\nclip_distillation:\n  steps: 2\nstages: [clip_distillation]\n")
    runs = os.path.join(out_root, "runs")
    done = sorted(d for d in (os.listdir(runs) if os.path.isdir(runs) else [])
                  if os.path.isdir(os.path.join(runs, d, "clip_distillation")))
    if not done:
        subprocess.run([SDCTL, "run", job], check=True)
        done = sorted(d for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d, "clip_distillation")))
    student = os.path.join(runs, done[-1], "clip_distillation")
    before, after = latency(os.path.join(model, "text_encoder")), latency(os.path.join(student, "text_encoder"))
    return {"teacher": before, "student": after,
            "latency_ratio": round(after["median_s"] / before["median_s"], 4),
            "parameter_ratio": round(after["parameters"] / before["parameters"], 4),
            "parameter_ratio_without_token_embedding": round(
                (after["parameters"] - 49408 * 768) / (before["parameters"] - 49408 * 768), 4)}


def report(teacher, student, base):
    ev = {n: json.load(open(os.path.join(EVAL, n, "eval.json"))) for n in ("student", "layer_dropped")}

    def summary(e):
        return {"accuracy": e["candidate"]["accuracy"], "psnr_db_to_teacher": e["fidelity"]["psnr_db"],
                "ssim_to_teacher": e["fidelity"]["ssim"], "seconds_per_image": e["candidate"]["seconds_per_image"]}

    s = ev["student"]
    ref = s["reference"]["accuracy"]
    prompts = [json.loads(l)["text"] for l in open(os.path.join(ROOT, "output", "toy-data", "heldout",
                                                                "metadata.jsonl"))][:100] + [""]
    wall = json.load(open(os.path.join(EVAL, "wall.json"))) if os.path.exists(os.path.join(EVAL, "wall.json")) else {}
    extra = {"command": "scripts/toy_clip_distill.sh", "steps": s["candidate"]["steps"], "guidance": 7.5,
             "teacher_encoder": {"accuracy": ref, "parameters": parameters(teacher),
                                 "layers": json.load(open(os.path.join(teacher, "text_encoder", "config.json")))[
                                     "num_hidden_layers"]},
             "student_encoder": {**summary(s), "parameters": parameters(student),
                                 "layers": json.load(open(os.path.join(student, "text_encoder", "config.json")))[
                                     "num_hidden_layers"]},
             "accuracy_points_vs_teacher": {k: round(100 * (s["candidate"]["accuracy"][k] - ref[k]), 2) for k in ref},
             "layer_dropped_undistilled": summary(ev["layer_dropped"]),
             "cross_attention": cross_attention_keys(teacher, {"student": student, "layer_dropped_undistilled": base},
                                                     prompts),
             "full_sd15_text_encoder": full_sd15(teacher), "wall_s": wall}
    write_result("toy_clip_distill", s["candidate"]["accuracy"]["shape"], ref["shape"],
                 "shape accuracy (fraction of held-out samples)", **extra)


if __name__ == "__main__":
    if sys.argv[1] == "layer-dropped":
        layer_dropped(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "report":
        report(*sys.argv[2:5])
    else:
        raise SystemExit(__doc__)
