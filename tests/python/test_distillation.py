"""progressive_distillation: trains phase by phase, writes a diffusers folder that
diffusers samples as we do, resumes exactly inside a phase, and is data-parallel."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_bin
from test_finetune_stage import run_stage, run_two_ranks, unet, write_stage_job
from test_parity import copy_with_scheduler


def write_job(tmp_path, model_dir, name="job", batch=2, extra="", lr="1.0e-4", steps=3):
    return write_stage_job(tmp_path, name, model_dir, "progressive_distillation",
                           f"  progressive_stages: [8, 4, 2]\n  steps: {steps}\n  lr: {lr}\n  ema_decay: 0.99\n{extra}",
                           seed=5, batch=batch, caption_dropout=0.3)


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


@pytest.mark.parametrize("sampling", ["grid", "uniform"])
def test_resume_inside_a_later_phase_is_exact(tiny_v, tmp_path, sampling):
    job = write_job(tmp_path, tiny_v, extra=f"  timestep_sampling: {sampling}\n")
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


@pytest.mark.parametrize("extra", ["", "  guided_scale: 5\n"], ids=["apart", "guided"])
def test_two_gloo_workers_match_one_worker_with_double_batch(tiny_v, tmp_path, extra):
    single = str(tmp_path / "single")
    # The seed's LR: Adam steps are about lr * sign(grad), so float-level noise in
    # near-zero gradients shows in proportion to lr (as in the finetune test).
    run_stage(write_job(tmp_path, tiny_v, "b2", batch=2, lr="1.0e-5", steps=6, extra=extra), str(tmp_path / "ckpt1"),
              single)
    dp = str(tmp_path / "dp")
    run_two_ranks(write_job(tmp_path, tiny_v, "b1", batch=1, lr="1.0e-5", steps=6, extra=extra), str(tmp_path / "ckpt2"),
                  dp)
    a, b, teacher = unet(single), unet(dp), unet(tiny_v)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
    assert max(float(np.abs(a[k] - teacher[k]).max()) for k in a) > 5e-5


@pytest.mark.parametrize("section, message", [
    ("  progressive_stages: [8, 8, 4]\n", "must decrease: 8 follows 8"),
    ("  progressive_stages: 50,25,12,3\n", "drops from 12 to 3 steps"),
    ("  progressive_stages: [6]\n", "needs the teacher's step count"),
    ("  timestep_spacing: linspace\n", "timestep_spacing"),
    ("  guided_scale: 5\n  guidance_range: [2, 10]\n", "set one of them"),
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


def write_cfg_job(tmp_path, model_dir, name="cfg", batch=2, lr="1.0e-4", steps=4, extra=""):
    return write_stage_job(tmp_path, name, model_dir, "cfg_distillation",
                           f"  steps: {steps}\n  lr: {lr}\n  guidance_range: [2, 10]\n  guidance_embedding_dim: 16\n{extra}",
                           seed=6, batch=batch, caption_dropout=0.2)


def test_cfg_student_runs_one_pass_per_step_in_diffusers_as_here(tiny_v, tmp_path):
    import diffusers
    from PIL import Image

    student = str(tmp_path / "student")
    run_stage(write_job(tmp_path, tiny_v), str(tmp_path / "ckpt_pd"), student)  # 8 -> 4 -> 2 steps
    out = str(tmp_path / "cfg")
    r = run_stage(write_cfg_job(tmp_path, student), str(tmp_path / "ckpt"), out)
    assert "step 4/4" in r.stdout
    cfg = json.load(open(os.path.join(out, "unet", "config.json")))
    assert cfg["time_cond_proj_dim"] == 16
    w = unet(out)["time_embedding.cond_proj.weight"]
    assert w.shape == (32, 16) and np.abs(w).max() > 0  # learned from its zero start
    d = json.load(open(os.path.join(out, "distillation.json")))
    assert d["steps"] == 2 and d["input"]["stage"] == "progressive_distillation"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for guidance in (3.0, 8.0):
        calls.clear()
        with torch.no_grad():
            ref = pipe(["a blue square"], num_inference_steps=2, guidance_scale=guidance, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(8)).images[0]
        assert calls == [1, 1]  # one UNet pass of batch 1 per step: guidance is baked in
        png = str(tmp_path / f"c{guidance}.png")
        run_bin("sdctl", "generate", "--model", out, "--prompt", "a blue square", "--guidance", guidance,
                "--seed", 8, "--out", png)  # the steps come from distillation.json
        ours = np.asarray(Image.open(png)).astype(np.int16)
        assert np.abs(ours - (ref * 255).round().astype(np.int16)).max() <= 1, guidance


def test_cfg_resume_is_exact_and_two_workers_match_one(tiny_v, tmp_path):
    job = write_cfg_job(tmp_path, tiny_v, steps=5)
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    assert run_stage(job, ckpt, out, stop_at=3, check=False).returncode != 0
    r = run_stage(job, ckpt, out)
    assert "step 3/5" in r.stdout and "step 2/5" not in r.stdout
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    single = str(tmp_path / "single")
    run_stage(write_cfg_job(tmp_path, tiny_v, "b2", batch=2, lr="1.0e-5", steps=8), str(tmp_path / "c1"), single)
    dp = str(tmp_path / "dp")
    run_two_ranks(write_cfg_job(tmp_path, tiny_v, "b1", batch=1, lr="1.0e-5", steps=8), str(tmp_path / "c2"), dp)
    a, b = unet(single), unet(dp)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert float(np.abs(a["time_embedding.cond_proj.weight"]).max()) > 5e-5


@pytest.mark.parametrize("value, message", [
    ("[10, 2]", "must be [low, high] with low < high"),
    ("[0.5, 2]", "out of range [1, 100]"),
    ("[2, 4, 8]", "got 3 values"),
])
def test_bad_guidance_range_is_refused(tiny_v, tmp_path, value, message):
    job = write_cfg_job(tmp_path, tiny_v)
    text = open(job).read().replace("guidance_range: [2, 10]", f"guidance_range: {value}")
    open(job, "w").write(text)
    r = run_bin("sdctl", "submit", job, check=False)
    assert r.returncode != 0 and message in r.stderr and "cfg_distillation.guidance_range" in r.stderr, r.stderr


def test_a_cfg_distilled_input_is_refused_by_both_stages(tiny_v, tmp_path):
    out = str(tmp_path / "cfg")
    run_stage(write_cfg_job(tmp_path, tiny_v, steps=1), str(tmp_path / "ckpt"), out)
    r = run_stage(write_cfg_job(tmp_path, out, "again", steps=1), str(tmp_path / "ckpt2"), str(tmp_path / "o2"),
                  check=False)
    assert r.returncode != 0 and "CFG-distilled already" in r.stderr
    r = run_stage(write_job(tmp_path, out), str(tmp_path / "ckpt3"), str(tmp_path / "o3"), check=False)
    assert r.returncode != 0 and "is CFG-distilled" in r.stderr and "guidance_range" in r.stderr


def test_steps_of_a_cfg_distilled_model_distil_at_its_guidance_scales(tiny_v, tmp_path):
    """Meng et al.'s order: guidance first, then progressive distillation of the w-conditioned student."""
    import diffusers
    from PIL import Image

    cfg = str(tmp_path / "cfg")
    run_stage(write_cfg_job(tmp_path, tiny_v, steps=2), str(tmp_path / "ckpt"), cfg)
    out = str(tmp_path / "pd")
    run_stage(write_job(tmp_path, cfg, "pd", extra="  guidance_range: [2, 10]\n"), str(tmp_path / "ckpt2"), out)
    assert json.load(open(os.path.join(out, "unet", "config.json")))["time_cond_proj_dim"] == 16
    a, b = unet(out), unet(cfg)
    assert float(np.abs(a["time_embedding.cond_proj.weight"] - b["time_embedding.cond_proj.weight"]).max()) > 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    with torch.no_grad():
        ref = pipe(["a green square"], num_inference_steps=2, guidance_scale=6.0, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(2)).images[0]
    png = str(tmp_path / "x.png")
    run_bin("sdctl", "generate", "--model", out, "--prompt", "a green square", "--guidance", 6.0, "--seed", 2,
            "--out", png)
    ours = np.asarray(Image.open(png)).astype(np.int16)
    assert np.abs(ours - (ref * 255).round().astype(np.int16)).max() <= 1


def test_guided_targets_train_the_guided_output(tiny_v, tmp_path):
    """guided_scale: the student's guided output is what is trained, so its cond and uncond
    move otherwise than when they are learned apart, and the result records the scale."""
    plain, guided = str(tmp_path / "plain"), str(tmp_path / "guided")
    run_stage(write_job(tmp_path, tiny_v, "p"), str(tmp_path / "c1"), plain)
    run_stage(write_job(tmp_path, tiny_v, "g", extra="  guided_scale: 5\n"), str(tmp_path / "c2"), guided)
    a, b, t = unet(plain), unet(guided), unet(tiny_v)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 1e-5
    assert max(float(np.abs(b[k] - t[k]).max()) for k in b) > 1e-5
    assert json.load(open(os.path.join(guided, "distillation.json")))["guided_scale"] == 5
