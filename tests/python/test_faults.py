"""The control plane under faults: each test provokes one fault for real (a locked store,
a second coordinator, a coordinator restart or pause, a crash, bad files) and checks the
promise docs/operations.md makes about it."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

from conftest import BIN
from test_control_plane import Cluster, assert_same_weights, free_port, result_unet, uninterrupted_unet, write_job
from test_finetune_stage import make_dataset


def events(cluster, job):
    return cluster.sdctl("logs", job).stdout


def status(cluster, job):
    return cluster.sdctl("status", job).stdout


def wait_step(cluster, job, step, timeout=120):
    deadline = time.time() + timeout
    while cluster.step(job) < step:
        assert time.time() < deadline, status(cluster, job)
        time.sleep(0.1)


def test_a_submit_the_store_refused_never_runs(tiny_sd, tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        c.start_worker("w1")
        # Another process holds the store's write lock for longer than the busy timeout.
        db = sqlite3.connect(os.path.join(c.root, "runs", "jobs.db"), timeout=0, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        r = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=4, workers=1), check=False)
        assert r.returncode == 1 and "job store" in r.stderr, r.stderr
        time.sleep(3)  # long enough for a ghost job to be scheduled and start training
        db.execute("ROLLBACK")
        db.close()
        assert c.sdctl("list").stdout.strip() == ""
        assert not [d for d in os.listdir(os.path.join(c.root, "runs")) if d.startswith("job-")]
        assert "running" not in c.worker_log("w1")
    finally:
        c.stop()


def test_a_new_job_never_takes_over_another_jobs_folder(tiny_sd, tmp_path):
    """The store is lost (deleted, or a second store on the same storage): job ids start
    again, but a job must not find the first job-000001's checkpoints and 'resume' them."""
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        c.start_worker("w1")
        job = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=4, workers=1)).stdout.strip()
        assert "SUCCEEDED" in c.wait_state(job, {"SUCCEEDED", "FAILED"})
        c.coordinator.kill()
        c.coordinator.wait()
        for f in os.listdir(os.path.join(c.root, "runs")):
            if f.startswith("jobs.db"):
                os.remove(os.path.join(c.root, "runs", f))
        c.start_coordinator(wait=True)
        second = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], name="other", steps=4, workers=1)).stdout.strip()
        assert second != job
        out = c.wait_state(second, {"SUCCEEDED", "FAILED"})
        assert "SUCCEEDED" in out and "step 4/4" in out
        assert "resumed from" not in events(c, second)  # trained from step 0, on its own folder
    finally:
        c.stop()


def test_two_coordinators_cannot_share_one_storage(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        second = subprocess.run(
            [os.path.join(BIN, "coordinator"), "--listen", f"127.0.0.1:{free_port()}", "--storage",
             os.path.join(c.root, "runs"), "--metrics-port", str(free_port())],
            capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "is in use by another coordinator (pid " in second.stderr, second.stderr
        assert f"listening on {c.addr}" in second.stderr
        # The lock dies with its holder, however it dies.
        c.coordinator.kill()
        c.coordinator.wait()
        c.start_coordinator(wait=True)
    finally:
        c.stop()


def test_a_restarted_coordinator_adopts_the_running_attempt(tiny_sd, tmp_path):
    """Killed mid-stage, the coordinator comes back, its workers say what they run, and the
    one attempt goes on: nothing else trains that stage, and the weights are those of an
    uninterrupted run."""
    expected = uninterrupted_unet(tmp_path, tiny_sd[0], steps=40, interval=4)
    c = Cluster(tmp_path / "c", heartbeat_timeout=8.0)
    try:
        c.start_coordinator(wait=True)
        for w in ("w1", "w2", "w3"):  # w3 stays idle: it must not be handed the stage
            c.start_worker(w)
        job = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=40, interval=4)).stdout.strip()
        wait_step(c, job, 6)
        c.coordinator.send_signal(signal.SIGKILL)
        c.coordinator.wait()
        c.start_coordinator()
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"})
        log = events(c, job)
        assert "SUCCEEDED" in out and "restarts 0" in out, out
        assert "adopted" in log and log.count("started on") == 1, log
        busy = [w for w in ("w1", "w2", "w3") if f"running {job}" in c.worker_log(w)]
        assert len(busy) == 2, busy
        assert_same_weights(result_unet(c, job), expected)
    finally:
        c.stop()


def test_a_lost_finish_is_retried_until_acknowledged(tiny_sd, tmp_path):
    """The coordinator is paused (SIGSTOP) across the end of a stage, longer than the
    Finish deadline but shorter than the heartbeat timeout."""
    c = Cluster(tmp_path, heartbeat_timeout=60.0)
    try:
        c.start_coordinator(wait=True)
        c.start_worker("w1")
        job = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=1, workers=1, interval=1)).stdout.strip()
        deadline = time.time() + 60
        while f"running {job}" not in c.worker_log("w1"):
            assert time.time() < deadline
            time.sleep(0.05)
        c.coordinator.send_signal(signal.SIGSTOP)
        time.sleep(20)  # the progress report and the first Finish both time out meanwhile
        c.coordinator.send_signal(signal.SIGCONT)
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"}, timeout=40)
        assert "SUCCEEDED" in out, out
        assert "finish not acknowledged" in c.worker_log("w1")
        assert "idle" in c.sdctl("workers").stdout
    finally:
        c.stop()


def test_a_nul_byte_is_refused_and_a_stored_job_that_no_longer_parses_fails_alone(tiny_sd, tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        path = write_job(tmp_path, tiny_sd[0], steps=2, workers=1)
        text = open(path).read()
        bad = tmp_path / "nul.yaml"
        bad.write_bytes(text.encode() + b"# a comment with a \x00 in it\n")
        r = c.sdctl("submit", str(bad), check=False)
        lines = text.count("\n") + 1
        assert r.returncode == 1 and f"{bad}:{lines}: contains a NUL byte" in r.stderr, r.stderr
        # A job stored by an older build whose key this build renamed.
        job = c.sdctl("submit", path).stdout.strip()
        c.coordinator.kill()
        c.coordinator.wait()
        db = sqlite3.connect(os.path.join(c.root, "runs", "jobs.db"))
        db.execute("UPDATE jobs SET yaml = ?, state = 'QUEUED' WHERE id = ?",
                   (text.replace("lr_warmup_steps", "warmup_steps_v0"), job))
        db.commit()
        db.close()
        c.start_coordinator(wait=True)  # it starts
        assert "FAILED" in status(c, job)
        assert "no longer parses" in events(c, job) and "warmup_steps_v0" in events(c, job)
        other = c.sdctl("submit", path).stdout.strip()  # and goes on serving
        assert other > job
    finally:
        c.stop()


def test_a_permanent_failure_ends_the_job_at_once_and_resume_continues_from_its_checkpoint(tiny_sd, tmp_path):
    """A dataset that loses an image mid-run fails the stage (too many skipped samples)
    without spending restarts on it; once the image is back, `sdctl resume` continues from
    the newest checkpoint and ends with the weights of an uninterrupted run."""
    expected = uninterrupted_unet(tmp_path, tiny_sd[0], workers=1, steps=30, interval=3)
    c = Cluster(tmp_path / "c")
    try:
        c.start_coordinator(wait=True)
        c.start_worker("w1")
        job = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=30, workers=1, interval=3)).stdout.strip()
        wait_step(c, job, 7)
        image = tmp_path / "data" / "3.png"
        os.rename(image, tmp_path / "aside.png")
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"})
        log = events(c, job)
        assert "FAILED" in out and "restarts 0" in out, out + log
        assert "1 of 6 samples skipped" in log and "3.png" in log and f"sdctl resume {job}" in log, log
        os.rename(tmp_path / "aside.png", image)
        assert c.sdctl("resume", job).returncode == 0
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"})
        log = events(c, job)
        assert "SUCCEEDED" in out, out + log
        assert "resumed; stage finetune continues" in log
        resumed = [l for l in log.splitlines() if "resumed from" in l]
        assert resumed and "step 0)" not in resumed[-1], log
        assert_same_weights(result_unet(c, job), expected)
    finally:
        c.stop()


def test_a_model_config_the_code_refuses_is_an_error_not_a_crash_loop(tiny_sd, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd[0], model)
    cfg_path = model / "unet" / "config.json"
    cfg = json.load(open(cfg_path))
    cfg["attention_head_dim"] = 0  # used to kill each worker that took the stage with SIGFPE
    json.dump(cfg, open(cfg_path, "w"))
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        c.start_worker("w1")
        c.start_worker("w2")
        job = c.sdctl("submit", write_job(tmp_path, str(model), steps=2, workers=1)).stdout.strip()
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"}, timeout=60)
        log = events(c, job)
        assert "FAILED" in out and "restarts 0" in out, out + log
        assert 'unet/config.json: key "attention_head_dim" must be positive, got 0' in log, log
        assert c.procs["w1"].poll() is None and c.procs["w2"].poll() is None  # nobody crashed
    finally:
        c.stop()


def test_a_crashed_worker_reports_its_signal_as_the_stages_error(tiny_sd, tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        c.start_worker("w1")
        job = c.sdctl("submit", write_job(tmp_path, tiny_sd[0], steps=40, workers=1, interval=4)).stdout.strip()
        wait_step(c, job, 3)
        c.procs["w1"].send_signal(signal.SIGSEGV)
        assert c.procs["w1"].wait(timeout=30) == -signal.SIGSEGV
        c.start_worker("w2")
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"})
        log = events(c, job)
        assert "SUCCEEDED" in out and "restarts 1" in out, out + log
        assert "worker w1 crashed: signal 11 (Segmentation fault) while running " + job in log, log
        assert "last words: step " in log
    finally:
        c.stop()


def test_skipped_samples_are_reported_and_fail_the_stage_above_the_threshold(tiny_sd, tmp_path):
    data = tmp_path / "data"
    make_dataset(str(data), malformed_line=True)
    os.remove(data / "4.png")
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        worker_metrics = free_port()
        c.start_worker("w1", worker_metrics)
        path = write_job(tmp_path, tiny_sd[0], steps=8, workers=1)
        job = c.sdctl("submit", path).stdout.strip()
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"})
        log = events(c, job)
        assert "FAILED" in out and "restarts 0" in out, out + log
        # The bad metadata line alone is 1 of 7 entries: over 1% before any step.
        assert "metadata.jsonl:3: expected" in log and "1 of 7 samples skipped" in log, log
        assert "more than data.max_skipped_fraction 0.01 allows" in log
        # Allowed: the job succeeds, and still says what it skipped.
        lenient = tmp_path / "lenient.yaml"
        lenient.write_text(open(path).read() + "data:\n  max_skipped_fraction: 0.5\n")
        job = c.sdctl("submit", str(lenient)).stdout.strip()
        out = c.wait_state(job, {"SUCCEEDED", "FAILED"})
        log = events(c, job)
        assert "SUCCEEDED" in out, out + log
        assert "metadata.jsonl:3: expected" in log and "4.png" in log, log
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{worker_metrics}/metrics").read().decode()
        assert 'sd_samples_skipped_total{stage="finetune"} 3' in text, text  # 1 + 2
    finally:
        c.stop()


def test_job_file_mistakes_get_a_clear_error_with_their_line(tiny_sd, tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(wait=True)
        good = open(write_job(tmp_path, tiny_sd[0], steps=2, workers=1)).read()
        cases = {
            "dup.yaml": ("model: /nonexistent\n" + good, 'key "model" given twice (first on line 1)'),
            "complex.yaml": (good + "? [a, b]\n: 1\n", "a key must be a plain name, not a list or mapping"),
            "big.yaml": (good + "# " + "x" * (10 << 20) + "\n", "a job file may be at most 1024 KiB"),
        }
        for name, (text, want) in cases.items():
            p = tmp_path / name
            p.write_text(text)
            r = c.sdctl("submit", str(p), check=False)
            assert r.returncode == 1 and want in r.stderr and str(p) in r.stderr, (name, r.returncode, r.stderr[:500])
        assert c.sdctl("list").stdout.strip() == ""
        # The README's `sdctl logs JOB -f`.
        c.start_worker("w1")
        p = tmp_path / "good.yaml"
        p.write_text(good)
        job = c.sdctl("submit", str(p)).stdout.strip()
        r = subprocess.run([os.path.join(BIN, "sdctl"), "logs", job, "-f", "--coordinator", c.addr],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.rstrip().endswith("succeeded"), r.stdout + r.stderr
    finally:
        c.stop()
