"""Quantization results on the toy world (scripts/toy_quantize.sh).

  python3 bench/toy_quantize.py QUANT_DIR
      QUANT_DIR: the quantize stage's folder of examples/toy-quantize.yaml. Reads the
      sdctl eval reports in output/toy-quantize-eval/{fp16,int8}/ (each against the
      fp32 teacher it was quantized from) and writes bench/results/toy_int8_accuracy.json:
      ours = the INT8 model's shape accuracy, reference = the fp32 teacher's, every
      attribute, the image PSNR to the teacher and the FP16 folder's numbers as extra keys.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import write_result  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EVAL = os.path.join(ROOT, "output", "toy-quantize-eval")


def summary(name, teacher_acc):
    e = json.load(open(os.path.join(EVAL, name, "eval.json")))
    c = e["candidate"]
    loss = {k: round(100 * (teacher_acc[k] - v), 2) for k, v in c["accuracy"].items()}
    return e, {"accuracy": c["accuracy"], "points_lost": loss, "worst_points_lost": max(loss.values()),
               "psnr_db_to_teacher": e["fidelity"]["psnr_db"], "ssim_to_teacher": e["fidelity"]["ssim"],
               "seconds_per_image": c["seconds_per_image"], "size_mb": c.get("size_mb"),
               "parameters": c["parameters"]}


def main():
    quant = sys.argv[1]
    e = json.load(open(os.path.join(EVAL, "int8", "eval.json")))
    teacher = {"accuracy": e["reference"]["accuracy"], "seconds_per_image": e["reference"]["seconds_per_image"],
               "size_mb": e["reference"].get("size_mb")}
    _, int8 = summary("int8", teacher["accuracy"])
    _, fp16 = summary("fp16", teacher["accuracy"])
    q = json.load(open(os.path.join(quant, "quantization.json")))
    i8 = q["int8_unet"]
    cal = i8.get("calibration", {})
    wall = os.path.join(EVAL, "wall.json")
    extra = {"command": "scripts/toy_quantize.sh", "steps": e["candidate"]["steps"], "guidance": e["guidance"],
             "prompts": e["count"], "seeds_per_prompt": e["seeds_per_prompt"],
             "teacher": teacher, "int8": int8, "fp16": fp16,
             "int8_within_1_point_every_attribute": int8["worst_points_lost"] <= 1.0,
             "int8_psnr_at_least_30_db": int8["psnr_db_to_teacher"] >= 30.0,
             "fp16_within_half_point_every_attribute": fp16["worst_points_lost"] <= 0.5,
             "calibration": {k: cal.get(k) for k in ("prompts", "steps", "guidance_scale", "clipping",
                                                    "clipping_candidates_psnr_db", "heldout_psnr_db")},
             "int8_layers": {"convolutions": i8["int8_convolutions"], "linears": i8["int8_linears"],
                             "float": i8["float_layers"]},
             "job_seconds": json.load(open(wall)) if os.path.exists(wall) else None,
             "run": os.path.relpath(quant, ROOT)}
    write_result("toy_int8_accuracy", int8["accuracy"]["shape"], teacher["accuracy"]["shape"],
                 "shape accuracy (fraction of held-out samples)", **extra)


if __name__ == "__main__":
    main()
