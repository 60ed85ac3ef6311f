"""sdserve under load: an open-loop generator at fixed arrival rates, on loopback.

  python3 bench/serve_load.py [--model output/toy-teacher/model] [--duration 20]

For each batching mode (none, dynamic, continuous) it starts sdserve on the
model, measures the mode's saturation throughput (a closed loop keeping twice
the batch size in flight), then offers Poisson arrivals at fractions of that
saturation up to 2x, each for --duration seconds, and records per rate:
throughput (images completed inside the window), p50/p99 latency of the
successful requests, clean 429s, any other error, and the server's peak RSS.
Writes bench/results/serve_toy_throughput.json: ours = continuous batching's
images/s at saturation, reference = no batching's; ratio = reference / ours
images per second, i.e. ours / reference time per image (below 1 is better).
"""
import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import write_result  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, os.environ.get("BUILD_DIR", "build"), "bin")


class Server:
    def __init__(self, model, mode, args):
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "sdserve"), "--model", model, "--http-port", "0", "--grpc-listen", "none",
             "--batching", mode, "--max-batch-size", str(args.max_batch_size),
             "--max-queue", str(args.max_queue), "--max-queue-delay-ms", str(args.max_queue_delay_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"http http://([\d.]+):(\d+)", line)
        if not m:
            raise SystemExit(f"sdserve did not start: {line!r}")
        self.host, self.port = m.group(1), int(m.group(2))
        self.peak_rss = 0
        self._watch = True
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self):
        while self._watch and self.proc.poll() is None:
            try:
                for line in open(f"/proc/{self.proc.pid}/status"):
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.2)

    def reset_peak(self):
        self.peak_rss = 0

    def request(self, body, timeout=120):
        """(status, seconds, images)"""
        t0 = time.perf_counter()
        try:
            c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            c.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            c.close()
            n = len(json.loads(data)["data"]) if r.status == 200 else 0
            return r.status, time.perf_counter() - t0, n
        except Exception as e:  # a dropped connection is an error, not a 429
            return f"error: {e}", time.perf_counter() - t0, 0

    def stop(self):
        self._watch = False
        self.proc.terminate()
        self.proc.wait(60)


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def body(args, i):
    return {"prompt": PROMPTS[i % len(PROMPTS)], "steps": args.steps, "seed": i, "n": 1,
            "guidance_scale": 7.5, "timeout": args.request_timeout}


PROMPTS = ["a red circle at the top", "a small blue square on the left", "a green triangle in the middle",
           "two yellow circles at the bottom", "a large purple square on the right"]


def saturation(server, args):
    """Images/s with 2x the batch size always in flight (closed loop)."""
    done, lock, stop = [], threading.Lock(), time.time() + args.duration
    t_start = time.perf_counter()

    def loop(k):
        i = k
        while time.time() < stop:
            status, _, n = server.request(body(args, i))
            with lock:
                done.append((time.perf_counter(), status, n))
            i += 1000
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(2 * args.max_batch_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window = [n for t, s, n in done if s == 200 and t - t_start <= args.duration]
    return sum(window) / args.duration


def open_loop(server, args, rate, seed):
    """Poisson arrivals at `rate` requests/s for args.duration seconds."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < args.duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    results, lock, threads = [], threading.Lock(), []
    server.reset_peak()
    t0 = time.perf_counter()

    def one(i, at):
        status, secs, n = server.request(body(args, i))
        with lock:
            results.append((at, status, secs, n))
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i, at))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    ok = [(at, secs, n) for at, s, secs, n in results if s == 200]
    in_window = sum(n for at, secs, n in ok if at + secs <= args.duration)
    lat = [secs for _, secs, _ in ok]
    return {"rate_per_s": round(rate, 3), "offered": len(arrivals), "ok": len(ok),
            "rejected_429": sum(1 for r in results if r[1] == 429),
            "errors": sum(1 for r in results if r[1] not in (200, 429)),
            "error_kinds": sorted({str(r[1]) for r in results if r[1] not in (200, 429)}),
            "throughput_images_per_s": round(in_window / args.duration, 3),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
            "peak_rss_mib": round(server.peak_rss / 2**20, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "output", "toy-teacher", "model"))
    p.add_argument("--modes", default="none,dynamic,continuous")
    p.add_argument("--rates", default="0.25,0.5,0.75,1.0,1.5,2.0", help="fractions of each mode's saturation")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=50)
    p.add_argument("--request-timeout", type=float, default=60)
    p.add_argument("--name", default="serve_toy_throughput")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.model, "model_index.json")):
        raise SystemExit(f"{args.model} is not a model folder (scripts/toy_world.sh trains the toy teacher)")
    modes = {}
    for mode in args.modes.split(","):
        server = Server(args.model, mode, args)
        try:
            server.request(body(args, 0))  # warm-up
            sat = saturation(server, args)
            print(f"{mode}: saturation {sat:.2f} images/s", flush=True)
            runs = []
            for k, frac in enumerate(float(x) for x in args.rates.split(",")):
                r = open_loop(server, args, frac * sat, seed=k)
                r["fraction_of_saturation"] = frac
                print(mode, json.dumps(r), flush=True)
                runs.append(r)
            modes[mode] = {"saturation_images_per_s": round(sat, 3), "rates": runs}
        finally:
            server.stop()
    ours = modes["continuous"]["saturation_images_per_s"]
    ref = modes["none"]["saturation_images_per_s"]
    write_result(args.name, ours, ref, "images/s at saturation", command="python3 bench/serve_load.py",
                 model=os.path.relpath(args.model, ROOT), steps=args.steps, guidance=7.5,
                 max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                 max_queue_delay_ms=args.max_queue_delay_ms, duration_s=args.duration,
                 # As the issue asks: time per image, ours over reference (below 1 is better).
                 ratio=round(ref / ours, 4),
                 ratio_note="reference / ours images per second = ours / reference time per image",
                 modes=modes)


if __name__ == "__main__":
    main()
