"""Pruning results on the toy world (scripts/toy_prune.sh).

  python3 bench/toy_prune.py KD_RUN TASK_RUN
      KD_RUN, TASK_RUN: the run folders of examples/toy-prune.yaml and of its
      teacher: none twin (each holds prune/ and finetune/). Reads the sdctl eval
      reports in output/toy-prune-eval/ and writes
      bench/results/toy_prune_finetune_accuracy.json: ours = the KD-fine-tuned
      model's shape accuracy, reference = the unpruned teacher's, every attribute
      and the pruned-only and task-only numbers as extra keys.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import write_result  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EVAL = os.path.join(ROOT, "output", "toy-prune-eval")


def summary(name):
    e = json.load(open(os.path.join(EVAL, name, "eval.json")))
    c = e["candidate"]
    return e, {"accuracy": c["accuracy"], "parameters": c["parameters"],
               "psnr_db_to_teacher": e["fidelity"]["psnr_db"], "ssim_to_teacher": e["fidelity"]["ssim"],
               "seconds_per_image": c["seconds_per_image"]}


def main():
    kd_run, task_run = sys.argv[1], sys.argv[2]
    e, kd = summary("kd")
    _, pruned = summary("pruned")
    _, task = summary("task_only")
    teacher = {"accuracy": e["reference"]["accuracy"], "parameters": e["reference"]["parameters"],
               "seconds_per_image": e["reference"]["seconds_per_image"]}
    for s in (kd, pruned, task):
        s["share_of_teacher"] = {k: round(v / teacher["accuracy"][k], 4) if teacher["accuracy"][k] else None
                                 for k, v in s["accuracy"].items()}
    report = json.load(open(os.path.join(kd_run, "prune", "prune_report.json")))["components"]
    walls = {n: json.load(open(os.path.join(EVAL, f"{n}.wall.json")))["seconds"]
             for n in ("toy-prune", "toy-prune-task-only") if os.path.exists(os.path.join(EVAL, f"{n}.wall.json"))}
    extra = {"command": "scripts/toy_prune.sh", "steps": e["candidate"]["steps"], "guidance": e["guidance"],
             "prompts": e["count"], "seeds_per_prompt": e["seeds_per_prompt"],
             "teacher": teacher, "pruned_only": pruned, "pruned_kd_finetuned": kd, "pruned_task_only_finetuned": task,
             "every_attribute_at_least_95_percent": all(v is None or v >= 0.95 for v in kd["share_of_teacher"].values()),
             "prune": {c: {"parameters": r["parameters"], **({"levels": [(lv["channels"], lv["kept"]) for lv in r["levels"]]}
                                                            if "levels" in r else {})}
                       for c, r in report.items()},
             "time_embedding_refit": report["unet"]["time_embedding_refit"],
             "job_seconds": walls,
             "runs": {"kd": os.path.relpath(kd_run, ROOT), "task_only": os.path.relpath(task_run, ROOT)}}
    write_result("toy_prune_finetune_accuracy", kd["accuracy"]["shape"], teacher["accuracy"]["shape"],
                 "shape accuracy (fraction of held-out samples)", **extra)


if __name__ == "__main__":
    main()
