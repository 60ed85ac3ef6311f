"""sdserve end to end on the tiny model: the OpenAI client, the HTTP API's errors,
batching (none / dynamic / continuous), the bounded queue, cancellation and
deadlines, gRPC, metrics and the web page in headless Chromium. Every image a
server returns is checked against `sdctl generate` with the same seed."""
import base64
import http.client
import io
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, ROOT, run_bin


class Server:
    def __init__(self, model_dir, *flags):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sdserve_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "sdserve"), "--model", model_dir, "--http-port", "0",
             "--grpc-listen", "127.0.0.1:0", "--threads", "2", *map(str, flags)],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = [None]
        t = threading.Thread(target=lambda: line.__setitem__(0, self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(120)
        m = re.search(r"http (http://\S+) grpc (\S+)", line[0] or "")
        if not m:
            self.stop()
            raise AssertionError(f"sdserve did not start: {line[0]!r}\n{open(self.log.name).read()}")
        self.url, self.grpc = m.group(1), m.group(2)
        self.port = int(self.url.rsplit(":", 1)[1])

    def post(self, body, path="/v1/images/generations", timeout=120):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def metric(self, name, **labels):
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.get("/metrics").splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            m = re.match(r"([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def stream(self, body):
        """Opens a streaming request; returns the connection and a generator of events."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", "/v1/images/generations", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()

        def events():
            buf = b""
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    for line in block.decode().splitlines():
                        if line.startswith("data: "):
                            yield json.loads(line[6:])

        return conn, events()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def png_array(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def reference(model_dir, tmp_path, prompt, steps, seed, n=1, guidance=7.5, extra=()):
    out = tmp_path / f"ref_{steps}_{seed}_{n}_{guidance}"
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", prompt, "--steps", steps,
            "--seed", seed, "--images-per-prompt", n, "--guidance", guidance, "--out-dir", out, *extra)
    return [np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB")).astype(np.int16) for i in range(n)]


def assert_same_image(got, want):
    # Batch composition (the prompts of several requests in one text-encoder
    # batch, other requests' rows in the UNet's) changes kernel blocking and so
    # the last float bits, which the random tiny model amplifies to a rounding
    # flip of one level on some pixels; a wrong step, timestep or seed differs by tens.
    diff = np.abs(got - want)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_openai_client_generates_what_sdctl_generates(tiny_sd, tmp_path):
    import openai

    model_dir, _ = tiny_sd
    with Server(model_dir, "--model-name", "tiny") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="not-needed", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.images.generate(model="tiny", prompt="a red square", n=2, size="32x32",
                                   response_format="b64_json", extra_body={"steps": 4, "seed": 3})
        assert len(r.data) == 2
        want = reference(model_dir, tmp_path, "a red square", 4, 3, n=2)
        for d, w in zip(r.data, want):
            got = png_array(d.b64_json)
            assert got.shape == (32, 32, 3)
            assert_same_image(got, w)
        # The API's own error type reaches the client, naming the field.
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model="tiny", prompt="x", size="30x32")
        assert e.value.body["param"] == "size"
        with pytest.raises(openai.NotFoundError):
            client.images.generate(model="dall-e-3", prompt="x")


def test_bad_requests_name_the_field(tiny_sd):
    model_dir, _ = tiny_sd
    with Server(model_dir) as s:
        cases = [
            ({"prompt": "x", "size": "33x32"}, "size"),
            ({"prompt": "x", "size": "big"}, "size"),
            ({"prompt": "x", "steps": 151}, "steps"),
            ({"prompt": "x", "n": 100}, "n"),
            ({"prompt": "word " * 80}, "prompt"),
            ({"prompt": "x", "response_format": "url"}, "response_format"),
            ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
            ({"prompt": "x", "scheduler": "nope"}, "scheduler"),
            ({"n": 1}, "prompt"),
        ]
        for body, field in cases:
            code, _, err = s.post(body)
            assert code == 400, (body, code, err)
            assert err["error"]["param"] == field, (body, err)
            assert field in err["error"]["message"] or field == "prompt", err
        code, _, err = s.post({"prompt": "word " * 80})
        assert "80 tokens" in err["error"]["message"] and "75" in err["error"]["message"]
        req = urllib.request.Request(s.url + "/v1/images/generations", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        assert s.metric("sdserve_rejected_requests_total", reason="invalid") == len(cases) + 2


def test_continuous_batching_lets_a_short_request_pass_a_long_one(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    with Server(model_dir, "--batching", "continuous", "--max-batch-size", "4",
                "--max-steps", "1000") as s:
        conn, events = s.stream({"prompt": "a blue circle", "steps": 1000, "seed": 1, "size": "64x64"})
        assert next(events)["type"] == "image_generation.progress"
        t0 = time.time()
        code, _, r = s.post({"prompt": "a green triangle", "steps": 3, "seed": 2, "n": 2, "size": "64x64"})
        assert code == 200, r
        # The long request is still denoising: the short one joined its batch,
        # each sample at its own timestep, and left when done.
        h = json.loads(s.get("/readyz"))
        assert h["running_images"] == 1, h
        assert time.time() - t0 < 30
        want = reference(model_dir, tmp_path, "a green triangle", 3, 2, n=2,
                         extra=("--height", 64, "--width", 64))
        for d, w in zip(r["data"], want):
            assert_same_image(png_array(d["b64_json"]), w)
        assert s.metric("sdserve_batch_images_bucket", le="2") < s.metric("sdserve_batch_images_count")
        conn.close()  # the client goes away: its slot frees at the next step
        deadline = time.time() + 30
        while json.loads(s.get("/readyz"))["running_images"] != 0:
            assert time.time() < deadline
            time.sleep(0.1)
        assert s.metric("sdserve_requests_total", code="CANCELLED") == 1
        assert s.metric("sdserve_unet_steps_total") < 1000


def test_mixed_requests_in_one_batch_each_equal_their_own_run(tiny_sd, tmp_path):
    """Different steps, seeds, guidance and counts share UNet batches."""
    model_dir, _ = tiny_sd
    reqs = [dict(prompt="a red square", steps=6, seed=11, n=1, guidance_scale=7.5),
            dict(prompt="a yellow circle at the top", steps=9, seed=12, n=2, guidance_scale=1.0),
            dict(prompt="two blue triangles", steps=4, seed=13, n=1, guidance_scale=3.0)]
    results = [None] * len(reqs)
    with Server(model_dir, "--batching", "continuous", "--max-batch-size", "8") as s:
        def go(i):
            results[i] = s.post(reqs[i])
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert s.metric("sdserve_batch_images_bucket", le="1") < s.metric("sdserve_batch_images_count")
    for q, (code, _, r) in zip(reqs, results):
        assert code == 200, r
        want = reference(model_dir, tmp_path, q["prompt"], q["steps"], q["seed"], n=q["n"],
                         guidance=q["guidance_scale"])
        assert len(r["data"]) == q["n"]
        for d, w in zip(r["data"], want):
            assert_same_image(png_array(d["b64_json"]), w)


def test_dynamic_batching_groups_waiting_requests(tiny_sd):
    model_dir, _ = tiny_sd
    with Server(model_dir, "--batching", "dynamic", "--max-batch-size", "4",
                "--max-queue-delay-ms", "2000") as s:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            s.post({"prompt": f"shape {i}", "steps": 4, "seed": i}))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [c for c, _, _ in results] == [200] * 3
        # Three requests, one batch of three for each of its 4 steps.
        assert s.metric("sdserve_unet_steps_total") == 4
        assert s.metric("sdserve_batch_images_sum") == 12
        h = json.loads(s.get("/readyz"))
        assert h["batching"] == "dynamic"


def test_full_queue_answers_429_with_retry_after(tiny_sd):
    model_dir, _ = tiny_sd
    with Server(model_dir, "--batching", "none", "--max-batch-size", "1", "--max-queue", "1",
                "--max-steps", "1000") as s:
        conn, events = s.stream({"prompt": "long", "steps": 1000, "size": "128x128"})
        next(events)
        queued = []
        t = threading.Thread(target=lambda: queued.append(s.post({"prompt": "queued", "steps": 2})))
        t.start()
        deadline = time.time() + 30
        while json.loads(s.get("/readyz"))["queue_depth"] != 1:
            assert time.time() < deadline
            time.sleep(0.05)
        code, headers, err = s.post({"prompt": "one too many", "steps": 2})
        assert code == 429, err
        assert int(headers["Retry-After"]) >= 1
        assert err["error"]["code"] == "queue_full"
        assert s.metric("sdserve_rejected_requests_total", reason="queue_full") == 1
        conn.close()
        t.join(60)
        assert queued and queued[0][0] == 200


def test_deadline_and_shutdown(tiny_sd):
    model_dir, _ = tiny_sd
    with Server(model_dir, "--max-steps", "1000") as s:
        t0 = time.time()
        code, _, err = s.post({"prompt": "slow", "steps": 1000, "size": "128x128", "timeout": 0.5})
        assert code == 504, err
        assert time.time() - t0 < 20
        assert s.metric("sdserve_requests_total", code="DEADLINE_EXCEEDED") == 1
        # A request still running when the server stops gets an answer, not a hang.
        conn, events = s.stream({"prompt": "interrupted", "steps": 1000, "size": "128x128"})
        next(events)
        s.proc.terminate()
        rest = list(events)
        assert rest and rest[-1]["type"] == "error", rest[-3:]
        assert s.proc.wait(30) == 0


def grpc_stubs(tmp_path):
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    out = tmp_path / "generation.pb"
    subprocess.run(["protoc", "-I", os.path.join(ROOT, "proto"), "--include_imports",
                    f"--descriptor_set_out={out}", "sd/v1/generation.proto"], check=True)
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(f)
    cls = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"sd.v1.{n}"))
    return grpc, cls("GenerateRequest"), cls("GenerateResponse"), cls("ServerHealthRequest"), \
        cls("ServerHealthResponse")


def test_grpc_streams_progress_and_images_and_cancels(tiny_sd, tmp_path):
    grpc, Req, Resp, HReq, HResp = grpc_stubs(tmp_path)
    model_dir, _ = tiny_sd
    with Server(model_dir, "--max-steps", "1000") as s, grpc.insecure_channel(s.grpc) as ch:
        health = ch.unary_unary("/sd.v1.GenerationService/Health",
                                request_serializer=HReq.SerializeToString, response_deserializer=HResp.FromString)
        assert health(HReq(), timeout=10).ready
        gen = ch.unary_stream("/sd.v1.GenerationService/Generate",
                              request_serializer=Req.SerializeToString, response_deserializer=Resp.FromString)
        events = list(gen(Req(prompt="a red square", n=2, steps=4, seed=5), timeout=60))
        steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
        images = [e.image for e in events if e.WhichOneof("event") == "image"]
        assert steps == [1, 2, 3, 4] and [i.index for i in images] == [0, 1]
        want = reference(model_dir, tmp_path, "a red square", 4, 5, n=2)
        for img, w in zip(images, want):
            got = np.asarray(Image.open(io.BytesIO(img.png)).convert("RGB")).astype(np.int16)
            assert_same_image(got, w)
        with pytest.raises(grpc.RpcError) as e:
            list(gen(Req(prompt="x", steps=9000), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps" in e.value.details()
        call = gen(Req(prompt="cancel me", steps=1000, width=128, height=128), timeout=120)
        next(call)
        call.cancel()
        deadline = time.time() + 30
        while s.metric("sdserve_requests_total", code="CANCELLED") != 1:
            assert time.time() < deadline
            time.sleep(0.1)
        # The call's deadline is the request's.
        with pytest.raises(grpc.RpcError) as e:
            list(gen(Req(prompt="slow", steps=1000, width=128, height=128), timeout=0.5))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def tiny_sd_guided(tiny_sd, tmp_path_factory):
    """A CFG-distilled-shaped tiny model (time_cond_proj_dim: guidance is a UNet input)."""
    import diffusers
    import torch
    from sdtest.tiny_models import make_unet

    _, pipe = tiny_sd
    d = str(tmp_path_factory.mktemp("serve_guided"))
    guided = diffusers.StableDiffusionPipeline(
        unet=make_unet(0, time_cond_proj_dim=12), vae=pipe.vae, text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        w = guided.unet.time_embedding.cond_proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    guided.save_pretrained(d)
    return d


def test_cfg_distilled_model_serves_one_pass_per_step(tiny_sd_guided, tmp_path):
    with Server(tiny_sd_guided) as s:
        reqs = [dict(prompt="a red square", steps=5, seed=1, guidance_scale=4.0),
                dict(prompt="a red square", steps=5, seed=1, guidance_scale=9.0)]
        results = [None, None]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, s.post(reqs[i]))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for q, (code, _, r) in zip(reqs, results):
            assert code == 200, r
            want = reference(tiny_sd_guided, tmp_path, q["prompt"], 5, 1, guidance=q["guidance_scale"])
            assert_same_image(png_array(r["data"][0]["b64_json"]), want[0])
        code, _, err = s.post({"prompt": "x", "negative_prompt": "blurry"})
        assert code == 400 and err["error"]["param"] == "negative_prompt"


def test_metrics_pass_promtool(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    with Server(model_dir) as s:
        assert s.post({"prompt": "x", "steps": 2})[0] == 200
        text = s.get("/metrics")
    for name in ["sdserve_queue_depth", "sdserve_batch_images_bucket", "sdserve_request_latency_seconds_bucket",
                 "sdserve_queue_seconds_bucket", "sdserve_images_total", "sdserve_unet_steps_total",
                 "sdserve_unet_sample_steps_total"]:
        assert name in text, name
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_web_page_in_headless_chromium(tiny_sd, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir, _ = tiny_sd
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    with Server(model_dir) as s:
        drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            drv.get(s.url + "/")
            WebDriverWait(drv, 30).until(lambda d: d.find_element(By.ID, "model").text != "?")
            drv.find_element(By.ID, "prompt").send_keys("a red circle at the top")
            steps = drv.find_element(By.ID, "steps")
            steps.clear()
            steps.send_keys("6")
            seed = drv.find_element(By.ID, "seed")
            seed.clear()
            seed.send_keys("4")
            drv.find_element(By.ID, "generate").click()
            WebDriverWait(drv, 90).until(lambda d: d.execute_script(
                "const i = document.querySelector('#result img');"
                "return i !== null && i.complete && i.naturalWidth > 0;"))
            assert drv.find_element(By.ID, "error").text == ""
            assert drv.find_element(By.ID, "status").text == "done"
            assert drv.execute_script("return document.getElementById('progress').value") == 6
            src = drv.find_element(By.CSS_SELECTOR, "#result img").get_attribute("src")
        finally:
            drv.quit()
    want = reference(model_dir, tmp_path, "a red circle at the top", 6, 4)
    assert_same_image(png_array(src.split(",", 1)[1]), want[0])
