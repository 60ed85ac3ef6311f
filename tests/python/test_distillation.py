"""progressive_distillation: trains phase by phase, writes a diffusers folder that
diffusers samples as we do, resumes exactly inside a phase, and is data-parallel."""
import json
import os
import socket
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import BIN, run_bin
from test_finetune_stage import make_dataset, run_stage, unet
from test_parity import copy_with_scheduler


def write_job(tmp_path, model_dir, name="job", batch=2, extra="", lr="1.0e-4", steps=3):
    data = make_dataset(str(tmp_path / "data"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""model: {model_dir}
dataset: {data}
seed: 5
batch_size: {batch}
checkpoint_interval: 2
data:
  caption_dropout: 0.3
stages: [progressive_distillation]
progressive_distillation:
  progressive_stages: [8, 4, 2]
  steps: {steps}
  lr: {lr}
  ema_decay: 0.99
{extra}""")
    return str(path)


@pytest.fixture(scope="module")
def tiny_v(tiny_sd, tmp_path_factory):
    """The tiny model as the toy teacher is configured: v-prediction, zero terminal SNR, leading."""
    import shutil

    dst = str(tmp_path_factory.mktemp("tiny_v"))
    shutil.rmtree(dst)
    copy_with_scheduler(tiny_sd[0], dst, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                        timestep_spacing="leading", steps_offset=1, _class_name="DDIMScheduler")
    return dst


def test_student_is_a_diffusers_folder_sampled_as_diffusers_does(tiny_v, tiny_sd, tmp_path):
    import diffusers
    from PIL import Image

    job = write_job(tmp_path, tiny_v, extra="  attention_weight: 0.5\n  keep_phase_models: true\n")
    out = str(tmp_path / "out")
    ckpt = str(tmp_path / "ckpt")
    r = run_stage(job, ckpt, out)
    assert "step 6/6" in r.stdout
    # One checkpoint folder per phase, named by its student's steps, each finished.
    for k in (4, 2):
        assert os.path.exists(os.path.join(ckpt, f"phase-{k}steps", "DONE"))
        m = json.load(open(os.path.join(ckpt, f"phase-{k}steps", "step-00000002" if k == 4 else "step-00000006",
                                        "manifest.json")))
        assert m["state"]["student_steps"] == k
    # The student's schedule: DDIM, trailing from t = 999, recorded in distillation.json.
    sched = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"]
    assert json.load(open(os.path.join(out, "distillation.json")))["steps"] == 2
    trained, teacher = unet(out), unet(tiny_v)
    assert sum(float(np.abs(trained[k] - teacher[k]).max()) > 1e-6 for k in teacher) > len(teacher) // 2
    # diffusers loads it with nothing but its folder and samples it as sdctl does.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    for guidance in (1.0, 7.5):
        with torch.no_grad():
            ref = pipe(["a red square"], num_inference_steps=2, guidance_scale=guidance, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(3)).images[0]
        png = str(tmp_path / f"g{guidance}.png")
        run_bin("sdctl", "generate", "--model", out, "--prompt", "a red square", "--steps", 2,
                "--guidance", guidance, "--seed", 3, "--out", png)
        ours = np.asarray(Image.open(png)).astype(np.int16)
        assert ref.std() > 0.01
        assert np.abs(ours - (ref * 255).round().astype(np.int16)).max() <= 1, guidance
    # The intermediate student is kept as a model folder too.
    mid = os.path.join(os.path.dirname(out), "artifacts", "progressive_distillation", "4steps")
    assert json.load(open(os.path.join(mid, "distillation.json")))["steps"] == 4


def test_resume_inside_a_later_phase_is_exact(tiny_v, tmp_path):
    job = write_job(tmp_path, tiny_v)
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    r = run_stage(job, ckpt, out, stop_at=5, check=False)  # phase 2 (steps 3..5), checkpoint at 4
    assert r.returncode != 0 and "stopped at step 5" in r.stderr
    r = run_stage(job, ckpt, out)
    assert "kept by an earlier attempt" in r.stdout and "step 5/6" in r.stdout and "step 4/6" not in r.stdout
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_gloo_workers_match_one_worker_with_double_batch(tiny_v, tmp_path):
    single = str(tmp_path / "single")
    # The seed's LR: Adam steps are about lr * sign(grad), so float-level noise in
    # near-zero gradients shows in proportion to lr (as in the finetune test).
    run_stage(write_job(tmp_path, tiny_v, "b2", batch=2, lr="1.0e-5", steps=6), str(tmp_path / "ckpt1"), single)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dp = str(tmp_path / "dp")
    job1 = write_job(tmp_path, tiny_v, "b1", batch=1, lr="1.0e-5", steps=6)
    procs = [subprocess.Popen([os.path.join(BIN, "sd_probe"), "stage", "--job", job1, "--stage",
                               "progressive_distillation", "--checkpoint-dir", str(tmp_path / "ckpt2"), "--out", dp,
                               "--rank", str(r), "--world-size", "2", "--rendezvous", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b, teacher = unet(single), unet(dp), unet(tiny_v)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
    assert max(float(np.abs(a[k] - teacher[k]).max()) for k in a) > 5e-5


@pytest.mark.parametrize("section, message", [
    ("  progressive_stages: [8, 8, 4]\n", "must decrease: 8 follows 8"),
    ("  progressive_stages: 50,25,12,3\n", "drops from 12 to 3 steps"),
    ("  progressive_stages: [6]\n", "needs the teacher's step count"),
    ("  timestep_spacing: linspace\n", "timestep_spacing"),
])
def test_bad_options_are_refused_at_submit(tiny_v, tmp_path, section, message):
    job = write_job(tmp_path, tiny_v).replace("  progressive_stages: [8, 4, 2]\n", "")
    text = open(job).read().replace("  progressive_stages: [8, 4, 2]\n", "") + section
    open(job, "w").write(text)
    r = run_bin("sdctl", "submit", job, check=False)  # refused before any coordinator is asked
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "job.yaml" in r.stderr and "progressive_distillation" in r.stderr


def test_a_teacher_without_a_scheduler_config_is_named(tiny_v, tmp_path):
    import shutil

    model = str(tmp_path / "model")
    shutil.copytree(tiny_v, model)
    os.remove(os.path.join(model, "scheduler", "scheduler_config.json"))
    r = run_stage(write_job(tmp_path, model), str(tmp_path / "ckpt"), str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "scheduler_config.json" in r.stderr, r.stderr
