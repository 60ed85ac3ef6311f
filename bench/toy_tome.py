"""Token merging on the toy world (scripts/toy_tome.sh).

  python3 bench/toy_tome.py
      Reads the sdctl eval reports in output/toy-tome-eval/<name>/ (the toy teacher with ToMe
      against itself without, same prompts and seeds) and writes
      bench/results/toy_tome_accuracy.json: ours = shape accuracy at ratio 0.5 on the
      highest-resolution attention, reference = the teacher's without ToMe; every attribute,
      PSNR to the unmerged images, time per image and the other settings as extra keys.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import write_result  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EVAL = os.path.join(ROOT, "output", "toy-tome-eval")
RUNS = {"r050_ds2": "ratio 0.5, max_downsample 2 (highest-resolution attention)",
        "r050_ds4": "ratio 0.5, max_downsample 4 (every attention)",
        "r075_ds2": "ratio 0.75, max_downsample 2"}


def main():
    runs, teacher = {}, None
    for name, label in RUNS.items():
        e = json.load(open(os.path.join(EVAL, name, "eval.json")))
        teacher = teacher or {"accuracy": e["reference"]["accuracy"],
                              "seconds_per_image": e["reference"]["seconds_per_image"]}
        c = e["candidate"]
        loss = {k: round(100 * (teacher["accuracy"][k] - v), 2) for k, v in c["accuracy"].items()}
        runs[name] = {"setting": label, "inference": e["inference"], "accuracy": c["accuracy"],
                      "points_lost": loss, "worst_points_lost": max(loss.values()),
                      "psnr_db_to_unmerged": e["fidelity"]["psnr_db"], "ssim_to_unmerged": e["fidelity"]["ssim"],
                      "seconds_per_image": c["seconds_per_image"],
                      "time_ratio_to_unmerged": round(c["seconds_per_image"] / teacher["seconds_per_image"], 3)}
    e = json.load(open(os.path.join(EVAL, "r050_ds2", "eval.json")))
    write_result("toy_tome_accuracy", runs["r050_ds2"]["accuracy"]["shape"], teacher["accuracy"]["shape"],
                 "shape accuracy (fraction of held-out samples)", command="scripts/toy_tome.sh",
                 steps=e["candidate"]["steps"], guidance=e["guidance"], prompts=e["count"],
                 seeds_per_prompt=e["seeds_per_prompt"], teacher=teacher, runs=runs,
                 note="the toy teacher's latents are 16x16 at most, where merging saves little time; "
                      "speed is measured on the SD1.5 configuration (tome_sd15_cpu_*.json)")


if __name__ == "__main__":
    main()
