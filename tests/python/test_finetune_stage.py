"""The finetune stage: trains, checkpoints, and resumes exactly after an interruption."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import run_bin


def make_dataset(path, n=6, malformed_line=False):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    lines = []
    rng = np.random.default_rng(0)
    for i in range(n):
        name, rgb = list(colors.items())[i % 3]
        img = np.full((40, 48, 3), 245, np.uint8)
        y, x = rng.integers(0, 20, size=2)
        img[y:y + 16, x:x + 16] = rgb
        Image.fromarray(img).save(os.path.join(path, f"{i}.png"))
        lines.append(f'{{"file_name": "{i}.png", "text": "a {name} square"}}')
    if malformed_line:
        lines.insert(2, "{not json")  # skipped and reported; the job says whether that is too many
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_stage_job(tmp_path, name, model_dir, stage, options, seed, batch=2, caption_dropout=None):
    """A one-stage job on make_dataset's images (checkpoints every 2 steps); `options` is the
    stage's section body, two-space indented lines."""
    data = make_dataset(str(tmp_path / "data"))
    dropout = "" if caption_dropout is None else f"data:\n  caption_dropout: {caption_dropout}\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: {model_dir}\ndataset: {data}\nseed: {seed}\nbatch_size: {batch}\n"
                    f"checkpoint_interval: 2\n{dropout}stages: [{stage}]\n{stage}:\n{options}")
    return str(path)


def write_job(tmp_path, model_dir, seed, warmup, finetune_extra=""):
    """A 6-step finetune job (batch 2, EMA, checkpoints every 2 steps) on make_dataset's images."""
    data = make_dataset(str(tmp_path / "data"))
    path = tmp_path / "job.yaml"
    path.write_text(f"""model: {model_dir}
dataset: {data}
seed: {seed}
batch_size: 2
checkpoint_interval: 2
stages: [finetune]
finetune:
  steps: 6
  lr: 1.0e-3
  ema: true
  lr_warmup_steps: {warmup}
{finetune_extra}""")
    return str(path)


@pytest.fixture()
def job(tiny_sd, tmp_path):
    return write_job(tmp_path, tiny_sd[0], seed=7, warmup=2)


def run_stage(job, ckpt, out, stop_at=None, check=True):
    args = ["stage", "--job", job, "--checkpoint-dir", ckpt, "--out", out]
    if stop_at is not None:
        args += ["--stop-at", stop_at]
    return run_bin("sd_probe", *args, check=check)


def run_two_ranks(job, ckpt, out):
    """The job's stage on 2 ranks (Gloo over loopback), one process each, as two workers run it."""
    import socket
    import subprocess

    from conftest import BIN

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([os.path.join(BIN, "sd_probe"), "stage", "--job", job, "--checkpoint-dir", ckpt,
                               "--out", out, "--rank", str(r), "--world-size", "2",
                               "--rendezvous", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def unet(out):
    return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_trains_and_writes_a_loadable_model(job, tmp_path, tiny_sd):
    out = str(tmp_path / "out")
    r = run_stage(job, str(tmp_path / "ckpt"), out)
    assert "step 6/6" in r.stdout
    trained = unet(out)
    teacher = load_file(os.path.join(tiny_sd[0], "unet", "diffusion_pytorch_model.safetensors"))
    moved = sum(float(np.abs(trained[k] - teacher[k]).max()) > 1e-6 for k in teacher)
    assert moved > len(teacher) // 2
    # The result is a complete model folder that sdctl can sample from.
    run_bin("sdctl", "generate", "--model", out, "--prompt", "a red square", "--steps", 2,
            "--out", str(tmp_path / "x.png"))


def test_resume_after_interruption_is_exact(job, tmp_path):
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "resumed")
    r = run_stage(job, ckpt, out, stop_at=3, check=False)
    assert r.returncode != 0 and "stopped at step 3" in r.stderr
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt, "step-*"))) == ["step-00000002"]
    r = run_stage(job, ckpt, out)
    assert "step 3/6" in r.stdout and "step 1/6" not in r.stdout  # resumed, not restarted
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_checkpoint_falls_back_to_the_previous(job, tmp_path):
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "out")
    run_stage(job, ckpt, out, stop_at=5, check=False)  # leaves step-2 and step-4
    latest = os.path.join(ckpt, "step-00000004", "unet.safetensors")
    with open(latest, "r+b") as f:
        f.seek(os.path.getsize(latest) // 2)
        f.write(b"\x00" * 64)
    r = run_stage(job, ckpt, out)
    assert "step 3/6" in r.stdout  # resumed from step 2
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_incomplete_manifest_falls_back_and_is_reported(job, tmp_path):
    """Valid JSON that lacks what a resume needs is passed over like a corrupt file, not fatal."""
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "out")
    run_stage(job, ckpt, out, stop_at=5, check=False)  # leaves step-2 and step-4
    manifest = os.path.join(ckpt, "step-00000004", "manifest.json")
    m = json.load(open(manifest))
    del m["state"]["adam_step"]
    json.dump(m, open(manifest, "w"))
    os.makedirs(os.path.join(ckpt, ".tmp-step-00000006-4242"))  # a write cut short by a kill
    r = run_stage(job, ckpt, out)
    assert "step 3/6" in r.stdout  # resumed from step 2
    assert 'step-00000004: manifest.json state has no integer "adam_step"' in r.stdout, r.stdout
    assert "event: removed " in r.stdout and not os.path.exists(os.path.join(ckpt, ".tmp-step-00000006-4242"))
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_no_usable_checkpoint_fails_unless_a_restart_from_zero_is_allowed(job, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "out")
    run_stage(job, ckpt, out, stop_at=5, check=False)
    for step in ("step-00000002", "step-00000004"):
        with open(os.path.join(ckpt, step, "manifest.json"), "w") as f:
            f.write('{"step": 1}')
    r = run_stage(job, ckpt, out, check=False)
    assert r.returncode != 0
    assert "none is usable" in r.stderr and "allow_restart_from_zero" in r.stderr, r.stderr
    assert "step 1/6" not in r.stdout  # it did not quietly start over
    with open(job, "a") as f:
        f.write("allow_restart_from_zero: true\n")
    r = run_stage(job, ckpt, out)
    assert "step 1/6" in r.stdout and "training again from step 0" in r.stdout


def test_two_gloo_workers_match_one_worker_with_double_batch(tiny_sd, tmp_path):
    """Data parallelism is correct: 2 ranks x batch 1 end where 1 rank x batch 2 does."""
    model_dir, _ = tiny_sd
    data = make_dataset(str(tmp_path / "data"))

    def job(batch):
        p = tmp_path / f"job_b{batch}.yaml"
        p.write_text(f"model: {model_dir}\ndataset: {data}\nseed: 3\nbatch_size: {batch}\ncheckpoint_interval: 2\n"
                     "stages: [finetune]\nfinetune:\n  steps: 8\n  lr: 1.0e-5\n  lr_warmup_steps: 0\n")
        return str(p)

    single = str(tmp_path / "single")
    run_stage(job(2), str(tmp_path / "ckpt1"), single)
    dp = str(tmp_path / "dp")
    run_two_ranks(job(1), str(tmp_path / "ckpt2"), dp)
    a, b = unet(single), unet(dp)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
    # ...while training moved the weights by several times that tolerance. (Adam steps
    # are about lr * sign(grad), so float-level gradient noise on near-zero gradients
    # shows up in proportion to lr: hence the default-sized lr here.)
    teacher = load_file(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(float(np.abs(a[k] - teacher[k]).max()) for k in a) > 5e-5


def te(d):
    """A model folder's text encoder weights; SD1.5's files say "text_model.embeddings...",
    transformers 5 saves "embeddings..."."""
    w = load_file(os.path.join(d, "text_encoder", "model.safetensors"))
    return {k.removeprefix("text_model."): v for k, v in w.items()}


def test_text_encoder_trains_with_the_unet_and_cached_latents_resume(tiny_sd, tmp_path):
    """train_text_encoder: both components learn, are checkpointed and resume exactly;
    cache_latents + cosine schedule on the same run."""
    from transformers import CLIPTextModel

    model_dir, _ = tiny_sd
    job = write_job(tmp_path, model_dir, seed=5, warmup=1,
                    finetune_extra="  lr_scheduler: cosine\n  train_text_encoder: true\n"
                                   "  cache_latents: true\n")
    full = str(tmp_path / "full")
    run_stage(str(job), str(tmp_path / "ckpt_full"), full)
    teacher = te(model_dir)
    trained = te(full)
    moved = [k for k in teacher if float(np.abs(trained[k] - teacher[k]).max()) > 1e-6]
    assert len(moved) > len(teacher) // 2, moved
    # Still a transformers text encoder, with the config it started from.
    CLIPTextModel.from_pretrained(os.path.join(full, "text_encoder"))

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    r = run_stage(str(job), ckpt, out, stop_at=3, check=False)
    assert r.returncode != 0 and "stopped at step 3" in r.stderr
    r = run_stage(str(job), ckpt, out)
    assert "step 3/6" in r.stdout and "step 1/6" not in r.stdout
    for a, b in ((unet(full), unet(out)), (trained, te(out))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_frozen_token_embedding_is_kept_and_written(tiny_sd, tmp_path):
    """train_token_embedding: false trains the rest of the text encoder and writes the
    embedding back unchanged, so the result is still a whole transformers model."""
    from transformers import CLIPTextModel

    model_dir, _ = tiny_sd
    job = write_job(tmp_path, model_dir, seed=5, warmup=1,
                    finetune_extra="  train_text_encoder: true\n  train_token_embedding: false\n")
    out = str(tmp_path / "out")
    run_stage(str(job), str(tmp_path / "ckpt"), out)
    before, after = te(model_dir), te(out)
    emb = "embeddings.token_embedding.weight"
    assert set(after) == set(before)
    np.testing.assert_array_equal(before[emb], after[emb])
    moved = [k for k in before if k != emb and float(np.abs(after[k] - before[k]).max()) > 1e-6]
    assert len(moved) > len(before) // 2, moved
    CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
