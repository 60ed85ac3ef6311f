"""The control plane end to end: coordinator + gRPC workers + sdctl, on loopback."""
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import BIN
from test_finetune_stage import make_dataset


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root, heartbeat_timeout=3.0):
        self.root = str(root)
        self.port = free_port()
        self.metrics_port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.hb = heartbeat_timeout
        self.procs = {}
        self.coordinator = None

    def log(self, name):
        """A daemon's output file (kept with the test's tmp_path for post-mortems)."""
        os.makedirs(os.path.join(self.root, "logs"), exist_ok=True)
        return open(os.path.join(self.root, "logs", f"{name}.log"), "a")

    def start_coordinator(self, *extra, wait=False):
        self.coordinator = subprocess.Popen(
            [os.path.join(BIN, "coordinator"), "--listen", self.addr, "--storage", os.path.join(self.root, "runs"),
             "--metrics-port", str(self.metrics_port), "--heartbeat-timeout", str(self.hb),
             "--rendezvous-base-port", str(free_port()), "--restart-backoff", "0.5", *extra],
            stdout=self.log("coordinator"), stderr=subprocess.STDOUT)
        if wait:
            deadline = time.time() + 30
            while self.sdctl("list", check=False).returncode != 0:
                assert time.time() < deadline and self.coordinator.poll() is None, "coordinator did not start"
                time.sleep(0.1)

    def start_worker(self, wid, metrics_port=0, grpc_port=0):
        self.procs[wid] = subprocess.Popen(
            [os.path.join(BIN, "worker"), "--coordinator", self.addr, "--id", wid, "--threads", "1",
             "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port)],
            stdout=self.log(wid), stderr=subprocess.STDOUT)

    def worker_log(self, wid):
        with open(os.path.join(self.root, "logs", f"{wid}.log")) as f:
            return f.read()

    def sdctl(self, *args, check=True):
        r = subprocess.run([os.path.join(BIN, "sdctl"), *args, "--coordinator", self.addr], capture_output=True,
                           text=True)
        if check and r.returncode != 0:
            raise AssertionError(r.stderr)
        return r

    def wait_state(self, job, states, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.sdctl("status", job, check=False)
            if r.returncode == 0:
                state = r.stdout.split()[2]
                if state in states:
                    return r.stdout
            time.sleep(0.3)
        raise AssertionError(f"{job} did not reach {states}: {r.stdout} {r.stderr}")

    def step(self, job):
        r = self.sdctl("status", job, check=False)
        if r.returncode != 0:
            return -1
        line = [l for l in r.stdout.splitlines() if "finetune" in l][0]
        return int(line.split("step")[1].split("/")[0])

    def stop(self):
        for p in [self.coordinator, *self.procs.values()]:
            if p and p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture()
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def write_job(tmp_path, model, name="job", steps=6, workers=2, interval=2):
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(str(data))
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {model}\ndataset: {data}\nseed: 1\nbatch_size: 1\n"
                 f"checkpoint_interval: {interval}\nmax_restarts: 3\nstages:\n  - finetune: {{workers: {workers}}}\n"
                 f"finetune:\n  steps: {steps}\n  lr: 1.0e-5\n  lr_warmup_steps: 0\n")
    return str(p)


def result_unet(cluster, job):
    return load_file(os.path.join(cluster.root, "runs", job, "finetune", "unet", "diffusion_pytorch_model.safetensors"))


def uninterrupted_unet(tmp_path, model, workers=2, **job):
    """The UNet the same job gives without any fault, on a cluster of its own."""
    ref = Cluster(tmp_path / "ref")
    try:
        ref.start_coordinator(wait=True)
        for i in range(workers):
            ref.start_worker(f"r{i + 1}")
        job_id = ref.sdctl("submit", write_job(tmp_path, model, workers=workers, **job)).stdout.strip()
        assert "SUCCEEDED" in ref.wait_state(job_id, {"SUCCEEDED", "FAILED"})
        return result_unet(ref, job_id)
    finally:
        ref.stop()


def assert_same_weights(got, expected, atol=0.0):
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=atol, err_msg=k)


def test_job_on_two_workers_with_metrics_scraped_by_prometheus(cluster, tiny_sd, tmp_path):
    import json
    import urllib.parse
    import urllib.request

    have_prometheus = shutil.which("promtool") is not None and shutil.which("prometheus") is not None
    cluster.start_coordinator()
    worker_metrics = free_port()
    cluster.start_worker("w1", worker_metrics)
    # w1 must hold its port before w2 binds its own ephemeral ones: free_port's port is free
    # again until w1 binds it, and w2 once took it (the scrape then read w2's metrics).
    deadline = time.time() + 30
    while True:
        try:
            if 'sd_worker_up{worker="w1"}' in urllib.request.urlopen(
                    f"http://127.0.0.1:{worker_metrics}/metrics").read().decode():
                break
        except OSError:
            pass
        assert time.time() < deadline, "w1 never served its metrics: " + cluster.worker_log("w1")
        time.sleep(0.1)
    cluster.start_worker("w2")
    prom = None
    if have_prometheus:
        # A real Prometheus scrapes the coordinator and a worker while the job runs.
        prom_port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sdcompress\n    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{cluster.metrics_port}', '127.0.0.1:{worker_metrics}']\n")
        prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def query(promql):
        q = urllib.parse.quote(promql)
        deadline = time.time() + 60
        while time.time() < deadline:
            time.sleep(1)
            try:
                r = json.load(urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?query={q}"))
                if r["data"]["result"]:
                    return float(r["data"]["result"][0]["value"][1])
            except OSError:
                pass
        return None

    try:
        job = cluster.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=150, interval=50)).stdout.strip()
        deadline = time.time() + 120
        while cluster.step(job) < 3:
            assert time.time() < deadline
            time.sleep(0.2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics").read().decode()
        assert f'sd_stage_step{{job_id="{job}",stage="finetune"}}' in text
        worker_text = urllib.request.urlopen(f"http://127.0.0.1:{worker_metrics}/metrics").read().decode()
        assert f'sd_worker_step{{job_id="{job}",stage="finetune",worker="w1"}}' in worker_text
        if have_prometheus:
            for t in (text, worker_text):
                check = subprocess.run(["promtool", "check", "metrics"], input=t, capture_output=True, text=True)
                assert check.returncode == 0, check.stdout + check.stderr
            # Over a range, not the instant value: a series goes stale once its stage ends, and
            # the tiny job may end between the two queries.
            assert query(f'max_over_time(sd_stage_step{{job_id="{job}"}}[10m]) > 0') > 0  # from the coordinator
            assert query(f'max_over_time(sd_worker_step{{job_id="{job}",worker="w1"}}[10m]) > 0') > 0  # the worker
        out = cluster.wait_state(job, {"SUCCEEDED", "FAILED"})
        assert "SUCCEEDED" in out and "step 150/150" in out and "workers 2" in out
    finally:
        if prom is not None:
            prom.kill()
            prom.wait()
    assert "w1" in cluster.sdctl("workers").stdout
    assert job in cluster.sdctl("list").stdout
    assert "stage finetune succeeded" in cluster.sdctl("logs", job).stdout
    # A finished job's series leave /metrics (one set per job ever run would pile up).
    time.sleep(0.5)  # the coordinator's next tick
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics").read().decode()
    worker_text = urllib.request.urlopen(f"http://127.0.0.1:{worker_metrics}/metrics").read().decode()
    assert f'job_id="{job}"' not in text and f'job_id="{job}"' not in worker_text
    assert 'sd_jobs{state="SUCCEEDED"} 1' in text
    # The result is a model sdctl can sample from.
    subprocess.run([os.path.join(BIN, "sdctl"), "generate", "--model", os.path.join(cluster.root, "runs", job, "finetune"),
                    "--prompt", "a red square", "--steps", "2", "--out", str(tmp_path / "x.png")], check=True)
    if not have_prometheus:
        pytest.skip("prometheus/promtool not installed")


def test_bad_job_yaml_is_refused_and_nothing_is_stored(cluster, tmp_path):
    cluster.start_coordinator()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\nstages: [finetune]\nfinetune:\n  stpes: 10\n")
    r = cluster.sdctl("submit", str(bad), check=False)
    assert r.returncode == 1
    assert f'{bad}:4: unknown key "finetune.stpes" (did you mean "steps"?)' in r.stderr
    unimplemented = tmp_path / "optimize.yaml"
    unimplemented.write_text("model: /m\nstages: [optimize]\n")
    r = cluster.sdctl("submit", str(unimplemented), check=False)
    assert "is not implemented in this build" in r.stderr
    assert cluster.sdctl("list").stdout.strip() == ""


def test_killed_worker_is_replaced_and_the_result_is_unchanged(cluster, tiny_sd, tmp_path):
    expected = uninterrupted_unet(tmp_path, tiny_sd[0], steps=24, interval=4)

    cluster.start_coordinator()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    job = cluster.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=24, interval=4)).stdout.strip()
    deadline = time.time() + 120
    while cluster.step(job) < 9 and time.time() < deadline:
        time.sleep(0.1)
    assert cluster.step(job) < 24, "the job finished before the kill; make it longer"
    cluster.procs["w2"].send_signal(signal.SIGKILL)
    cluster.start_worker("w3")
    out = cluster.wait_state(job, {"SUCCEEDED", "FAILED"})
    # The surviving rank fails at once (its peer vanished mid-collective); the dead
    # rank counts as stopping until its heartbeats expire, so the one restart waits
    # for that and runs on w1 and w3, from the latest checkpoint.
    restarts = int(out.split("restarts")[1].split()[0])
    assert "SUCCEEDED" in out and restarts == 1, out
    assert "missed heartbeats" in cluster.sdctl("logs", job).stdout
    assert_same_weights(result_unet(cluster, job), expected, atol=1e-6)


def test_coordinator_restart_keeps_the_job(cluster, tiny_sd, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    job = cluster.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=24, interval=4)).stdout.strip()
    deadline = time.time() + 120
    while cluster.step(job) < 5 and time.time() < deadline:
        time.sleep(0.1)
    cluster.coordinator.send_signal(signal.SIGKILL)
    cluster.coordinator.wait()
    cluster.start_coordinator()
    out = cluster.wait_state(job, {"SUCCEEDED", "FAILED"})
    assert "SUCCEEDED" in out, out
    assert "coordinator restarted" in cluster.sdctl("logs", job).stdout


def test_twenty_jobs_on_two_workers(cluster, tiny_sd, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    path = write_job(tmp_path, tiny_sd[0], steps=2, workers=1, interval=2)
    jobs = [cluster.sdctl("submit", path).stdout.strip() for _ in range(20)]
    for j in jobs:
        assert "SUCCEEDED" in cluster.wait_state(j, {"SUCCEEDED", "FAILED"}), j
    # No task ever ran twice concurrently: each job's log shows exactly one start.
    for j in jobs:
        assert cluster.sdctl("logs", j).stdout.count("started on") == 1, j


def test_sdctl_run_embedded(tiny_sd, tmp_path):
    """sdctl run: embedded coordinator + local workers, progress, teardown, exit status."""
    path = write_job(tmp_path, tiny_sd[0], steps=4, workers=2)
    with open(path, "a") as f:
        f.write(f"output: {tmp_path / 'out'}\n")
    def local_workers():
        out = subprocess.run(["pgrep", "-f", "--", "--id local-"], capture_output=True, text=True).stdout
        return set(out.split())

    before = local_workers()  # another sdctl run on this machine is not ours to judge
    r = subprocess.run([os.path.join(BIN, "sdctl"), "run", path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "SUCCEEDED" in r.stdout
    assert "[##############################] finetune 4/4" in r.stderr
    job = r.stdout.split()[0]
    assert os.path.exists(tmp_path / "out" / "runs" / job / "finetune" / "unet" / "diffusion_pytorch_model.safetensors")
    # Nothing is left running.
    assert subprocess.run(["pgrep", "-f", "--", f"--storage {tmp_path / 'out' / 'runs'}"]).returncode == 1
    assert not local_workers() - before
    # A job that cannot succeed (its dataset is missing) fails after its restarts: exit status 1.
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(path).read().replace(str(tmp_path / "data"), str(tmp_path / "nowhere"))
                   .replace("max_restarts: 3", "max_restarts: 1"))
    r = subprocess.run([os.path.join(BIN, "sdctl"), "run", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "FAILED" in r.stdout and f"dataset {tmp_path / 'nowhere'} does not exist" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sdctl_run_killed_takes_its_daemons_down(tiny_sd, tmp_path, sig):
    """A killed `sdctl run` (a CI timeout, `kill`, even SIGKILL) leaves no coordinator
    or worker training on in the background."""
    path = write_job(tmp_path, tiny_sd[0], steps=100000, workers=1, interval=1000)
    runs = tmp_path / "out" / "runs"
    with open(path, "a") as f:
        f.write(f"output: {tmp_path / 'out'}\n")
    p = subprocess.Popen([os.path.join(BIN, "sdctl"), "run", path], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(runs / "logs" / "worker-0.log") or "finetune" not in open(
            runs / "logs" / "worker-0.log").read():
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "no start"
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2  # the coordinator and the worker, training

    def running(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\nState:\tZ" not in f.read()  # a zombie has exited
        except FileNotFoundError:
            return False

    p.send_signal(sig)
    p.wait(timeout=60)
    deadline = time.time() + 30
    while any(running(c) for c in children) and time.time() < deadline:
        time.sleep(0.5)
    assert not [c for c in children if running(c)], "daemons still running after sdctl was killed"


def test_every_daemon_serves_grpc_health(cluster):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cluster.start_coordinator()
    worker_grpc = free_port()
    cluster.start_worker("w1", grpc_port=worker_grpc)
    deadline = time.time() + 30
    while "w1" not in cluster.sdctl("workers", check=False).stdout and time.time() < deadline:
        time.sleep(0.2)
    assert "GiB" in cluster.sdctl("workers").stdout  # registration carries memory
    for addr in (cluster.addr, f"127.0.0.1:{worker_grpc}"):
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, addr
