"""Control-plane benchmarks on loopback, written to bench/results/:

- submit_to_first_step: `sdctl submit` to the first reported training step through
  coordinator + worker, against the same stage started directly in-process
  (sd_probe stage) as the reference. Model load happens in both, so the
  difference is the control plane's own latency.
- dp_step_time_2_vs_1: per-step time of the tiny model's finetune with 2 Gloo
  workers (batch 1 each) against 1 worker (batch 1); both workers share this
  machine's cores (1 thread each).

    .venv/bin/python bench/bench_control_plane.py
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

import torch  # noqa: E402

from run_bench import machine  # noqa: E402
from test_control_plane import Cluster, free_port, write_job  # noqa: E402

BIN = os.path.join(ROOT, "build", "bin")


def record(name, ours, ref, unit, note):
    rec = {"name": name, "ours": round(ours, 4), "reference": round(ref, 4), "unit": unit,
           "ratio": round(ours / ref, 4), "machine": machine(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "bench/bench_control_plane.py", "note": note}
    with open(os.path.join(ROOT, "bench", "results", name + ".json"), "w") as f:
        json.dump(rec, f, indent=2)
    print(f"{name:40s} ours {ours:8.3f} {unit} reference {ref:8.3f}  ratio {ours / ref:.3f}")


def first_step_direct(job, tmp, run):
    t0 = time.perf_counter()
    p = subprocess.Popen([os.path.join(BIN, "sd_probe"), "stage", "--job", job, "--checkpoint-dir",
                          os.path.join(tmp, f"direct_ckpt{run}"), "--out", os.path.join(tmp, f"direct_out{run}")],
                         stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 1/"):
            dt = time.perf_counter() - t0
            break
    p.wait()
    return dt


def first_step_cluster(cluster, job):
    t0 = time.perf_counter()
    jid = cluster.sdctl("submit", job).stdout.strip()
    while cluster.step(jid) < 1:
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    cluster.wait_state(jid, {"SUCCEEDED", "FAILED"})
    return dt


def step_time(metrics_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    vals = {l.split()[0].split("{")[0]: float(l.split()[-1]) for l in text.splitlines()
            if l.startswith("sd_worker_step_seconds_sum") or l.startswith("sd_worker_step_seconds_count")}
    return vals["sd_worker_step_seconds_sum"] / vals["sd_worker_step_seconds_count"]


def main():
    from sdtest.tiny_models import make_pipeline

    tmp = tempfile.mkdtemp(prefix="bench_cp_")
    model = os.path.join(tmp, "tiny-sd")
    make_pipeline(model)
    from pathlib import Path

    job = write_job(Path(tmp), model, name="lat", steps=3, workers=1)
    direct = min(first_step_direct(job, tmp, i) for i in range(3))
    c = Cluster(tmp)
    c.start_coordinator()
    c.start_worker("w1")
    time.sleep(1.0)
    try:
        via = min(first_step_cluster(c, job) for _ in range(3))
    finally:
        c.stop()
    record("control_plane_submit_to_first_step_tiny", via, direct, "s",
           "reference: the same stage started in-process; the difference is scheduling + polling latency")

    results = {}
    for n in (1, 2):
        c = Cluster(os.path.join(tmp, f"dp{n}"))
        os.makedirs(c.root, exist_ok=True)
        c.start_coordinator()
        port = free_port()
        c.start_worker("w0", port)
        if n == 2:
            c.start_worker("w1")
        try:
            jid = c.sdctl("submit", write_job(Path(tmp), model, name=f"dp{n}", steps=20, workers=n,
                                              interval=100)).stdout.strip()
            c.wait_state(jid, {"SUCCEEDED", "FAILED"})
            results[n] = step_time(port)
        finally:
            c.stop()
    record("dp_step_time_2_vs_1_workers_tiny", results[2], results[1], "s",
           "per-step time, batch 1 per worker, 1 thread each, both workers on this machine")


if __name__ == "__main__":
    main()
