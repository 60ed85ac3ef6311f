"""Writes the toy world's distillation results (bench/results/toy_distill_6step_accuracy.json,
toy_cfg_distill_6step.json) from the sdctl eval reports scripts/toy_distill.sh leaves in
output/toy-distill-eval/<name>/eval.json. ours = the student's shape accuracy, reference =
the teacher's at 50 DDIM steps (CFG 7.5, same prompts and seeds)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import write_result  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EVAL = os.path.join(ROOT, "output", "toy-distill-eval")


def load(name):
    return json.load(open(os.path.join(EVAL, name, "eval.json")))


def summary(e):
    return {"accuracy": e["candidate"]["accuracy"], "steps": e["candidate"]["steps"],
            "psnr_db_to_teacher50": e["fidelity"]["psnr_db"], "ssim_to_teacher50": e["fidelity"]["ssim"],
            "seconds_per_image": e["candidate"]["seconds_per_image"]}


def write(name, ours_eval, extra):
    write_result(name, ours_eval["candidate"]["accuracy"]["shape"], ours_eval["reference"]["accuracy"]["shape"],
                 "shape accuracy (fraction of held-out samples)",
                 teacher50={"accuracy": ours_eval["reference"]["accuracy"],
                            "seconds_per_image": ours_eval["reference"]["seconds_per_image"]},
                 command="scripts/toy_distill.sh", **extra)


def main():
    evals = {n: load(n) for n in sorted(os.listdir(EVAL)) if os.path.exists(os.path.join(EVAL, n, "eval.json"))}
    s6 = evals["student6"]
    teacher6 = {n: summary(evals[n]) for n in ("teacher6_leading", "teacher6_trailing")}
    best = max(teacher6, key=lambda n: teacher6[n]["psnr_db_to_teacher50"])
    others = {n: summary(e) for n, e in evals.items() if n not in ("student6", "cfg6")}
    wall = json.load(open(os.path.join(EVAL, "wall.json"))) if os.path.exists(os.path.join(EVAL, "wall.json")) else {}
    write("toy_distill_6step_accuracy", s6, {
        "student6": summary(s6), "teacher6_best": best, "teacher6": teacher6,
        "psnr_gain_db_over_best_teacher6": round(summary(s6)["psnr_db_to_teacher50"]
                                                 - teacher6[best]["psnr_db_to_teacher50"], 3),
        "other_evals": others, "wall_s": wall})
    if "cfg6" in evals:
        c = evals["cfg6"]
        write("toy_cfg_distill_6step", c, {
            "cfg_student6": summary(c), "two_pass_student6": summary(s6),
            "unet_evaluations_per_image": {"cfg_student6": c["candidate"]["steps"],
                                           "two_pass_student6": 2 * s6["candidate"]["steps"],
                                           "teacher50": 2 * c["reference"]["steps"]},
            "accuracy_points_vs_two_pass": {k: round(100 * (c["candidate"]["accuracy"][k]
                                                            - s6["candidate"]["accuracy"][k]), 2)
                                            for k in c["candidate"]["accuracy"]},
            "psnr_db_vs_two_pass": round(summary(c)["psnr_db_to_teacher50"] - summary(s6)["psnr_db_to_teacher50"], 3),
            # Meng et al.'s order: CFG distillation of the 50-step teacher, then progressive
            # distillation of the w-conditioned student (MENG=1 scripts/toy_distill.sh).
            "meng_order_cfg_then_progressive": summary(evals["cfg6_meng_order"])
            if "cfg6_meng_order" in evals else None,
            "wall_s": wall})


if __name__ == "__main__":
    main()
