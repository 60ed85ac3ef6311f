"""Numerical parity of the C++ core with diffusers/transformers on tiny random models (fp32, CPU)."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_bin

ATOL = 1e-4


def probe(cmd, model_dir, inputs, tmp_path, *extra):
    inp = os.path.join(tmp_path, f"{cmd}_in.safetensors")
    out = os.path.join(tmp_path, f"{cmd}_out.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, inp)
    run_bin("sd_probe", cmd, "--model", model_dir, "--inputs", inp, "--out", out, *extra)
    return load_file(out)


def assert_diffusers_samples_as_sdctl(model_dir, tmp_path, prompt, steps, guidance, seed):
    """diffusers' StableDiffusionPipeline, loaded from the folder alone, gives the image
    `sdctl generate` does, within 1/255."""
    import diffusers
    from PIL import Image

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    with torch.no_grad():
        img = pipe([prompt], num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    png = str(tmp_path / "sdctl.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", prompt, "--steps", steps, "--guidance", guidance,
            "--seed", seed, "--out", png)
    assert np.abs(np.asarray(Image.open(png)).astype(np.int16) - (img * 255).round().astype(np.int16)).max() <= 1


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_text_encoder_hidden_states(tiny_sd, tmp_path):
    model_dir, pipe = tiny_sd
    ids = pipe.tokenizer(["a small red triangle", "", "a blue star at the top left on a green background"],
                         padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids, output_hidden_states=True)
    out = probe("text-encoder", os.path.join(model_dir, "text_encoder"), {"input_ids": ids}, tmp_path)
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state) < ATOL
    assert maxdiff(out["pooler_output"], ref.pooler_output) < ATOL
    assert len(ref.hidden_states) == len([k for k in out if k.startswith("hidden_states.")])
    for i, h in enumerate(ref.hidden_states):
        assert maxdiff(out[f"hidden_states.{i}"], h) < ATOL, f"hidden_states[{i}]"


def test_text_encoder_attention_maps(tiny_sd, tmp_path):
    """The maps text-encoder distillation matches are transformers' output_attentions."""
    import transformers

    model_dir, pipe = tiny_sd
    ids = pipe.tokenizer(["a small red triangle", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    te = transformers.CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"),
                                                    attn_implementation="eager")
    with torch.no_grad():
        ref = te(ids, output_attentions=True)
    out = probe("text-encoder", os.path.join(model_dir, "text_encoder"), {"input_ids": ids}, tmp_path,
                "--attention-maps")
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state) < ATOL  # the explicit path too
    assert len(ref.attentions) == len([k for k in out if k.startswith("attentions.")])
    for i, a in enumerate(ref.attentions):
        assert maxdiff(out[f"attentions.{i}"], a) < ATOL, f"attentions[{i}]"


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "channels_last+fused_qkv"])
@pytest.mark.parametrize("timestep", [0, 481, 999])
def test_unet_forward(tiny_sd, tmp_path, timestep, optimized):
    model_dir, pipe = tiny_sd
    g = torch.Generator().manual_seed(timestep)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(timestep, dtype=torch.int64)
    with torch.no_grad():
        ref = pipe.unet(sample, t, encoder_hidden_states=ctx).sample
    out = probe("unet", os.path.join(model_dir, "unet"),
                {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}, tmp_path,
                *(["--optimized"] if optimized else []))
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    assert maxdiff(out["sample"], ref) < ATOL


def test_unet_odd_latent_size_and_attention_maps(tiny_sd, tmp_path):
    """Latents not divisible by 2^n exercise the upsample-size path; maps come back per attention."""
    model_dir, pipe = tiny_sd
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(1, 4, 13, 11, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    t = torch.tensor(300)
    with torch.no_grad():
        ref = pipe.unet(sample, t, encoder_hidden_states=ctx).sample
    out = probe("unet", os.path.join(model_dir, "unet"),
                {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}, tmp_path, "--attention-maps")
    assert maxdiff(out["sample"], ref) < ATOL
    maps = {k: v for k, v in out.items() if k.startswith("attn.")}
    # tiny UNet: 2 transformers down, 1 mid, 3 up; each has attn1 (self) and attn2 (cross)
    assert len(maps) == 12
    cross = maps["attn.down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert cross.shape == (1, 2, 13 * 11, 77)
    torch.testing.assert_close(cross.sum(-1), torch.ones(1, 2, 13 * 11))


def test_vae_encode_decode(tiny_sd, tmp_path):
    model_dir, pipe = tiny_sd
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        post = pipe.vae.encode(images).latent_dist
        dec = pipe.vae.decode(latents).sample
    out = probe("vae", os.path.join(model_dir, "vae"), {"images": images, "latents": latents}, tmp_path)
    assert maxdiff(out["mean"], post.mean) < ATOL
    assert maxdiff(out["logvar"], post.logvar) < ATOL
    assert maxdiff(out["decoded"], dec) < ATOL


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def reference_images(pipe, model_dir, scheduler, prompts, negative, steps, guidance, latents=None, seed=None):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[scheduler])
    pipe.scheduler = cls.from_pretrained(model_dir, subfolder="scheduler")
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    if latents is not None:
        kwargs["latents"] = latents
    else:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        return pipe(prompts, negative_prompt=negative, **kwargs).images


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_text_to_image_matches_diffusers(tiny_sd, tmp_path, scheduler):
    model_dir, pipe = tiny_sd
    prompts = ["a small red circle at the top left", "a large blue star on a yellow background"]
    negative = ["blurry", "blurry"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    ref = reference_images(pipe, model_dir, scheduler, prompts, negative, 8, 7.5, latents=latents)
    lat_path = os.path.join(tmp_path, "latents.safetensors")
    save_file({"latents": latents}, lat_path)
    out_dir = os.path.join(tmp_path, "out")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", prompts[0], "--prompt", prompts[1],
            "--negative-prompt", "blurry", "--steps", 8, "--guidance", 7.5, "--scheduler", scheduler,
            "--latents", lat_path, "--out-dir", out_dir)
    from PIL import Image

    ours = np.stack([np.asarray(Image.open(os.path.join(out_dir, f"{i:04d}.png"))) for i in range(2)])
    ref_u8 = (ref * 255).round().astype(np.int16)
    assert ref.std() > 0.01  # a real image, not a constant
    assert np.abs(ours.astype(np.int16) - ref_u8).max() <= 1


def test_seeded_generation_matches_diffusers_generator(tiny_sd, tmp_path):
    """Without given latents, --seed S draws the same noise as torch.Generator('cpu').manual_seed(S)."""
    model_dir, pipe = tiny_sd
    ref = reference_images(pipe, model_dir, "euler", ["a green square"], None, 4, 5.0, seed=1234)
    out = os.path.join(tmp_path, "seed.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "a green square", "--steps", 4,
            "--guidance", 5.0, "--seed", 1234, "--scheduler", "euler", "--out", out)
    from PIL import Image

    ours = np.asarray(Image.open(out)).astype(np.int16)
    assert np.abs(ours - (ref[0] * 255).round().astype(np.int16)).max() <= 1


def test_train_step_matches_pytorch(tiny_sd, tmp_path):
    """One AdamW step of the denoising loss updates the UNet as PyTorch does.

    Checked in two parts, each at a tolerance that holds on any x86 CPU: the loss and the
    gradients (relative to each gradient's size: two CPUs' kernels sum in other orders), then
    the optimizer step on its own, PyTorch's AdamW fed our gradients. Comparing the weights
    after the step directly would not work: Adam's first step is about lr * grad / |grad|, so a
    gradient entry near zero that differs in its last bits moves its weight by up to lr.
    """
    import copy

    from diffusers import DDIMScheduler

    model_dir, pipe = tiny_sd
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    timesteps = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, 32, generator=g)
    unet = copy.deepcopy(pipe.unet).train()
    sched = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    noisy = sched.add_noise(latents, noise, timesteps)
    loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, ctx).sample.float(), noise.float())
    loss.backward()
    inp = os.path.join(tmp_path, "train_in.safetensors")
    out = os.path.join(tmp_path, "train_out.safetensors")
    save_file({"latents": latents, "noise": noise, "timesteps": timesteps, "encoder_hidden_states": ctx}, inp)
    run_bin("sd_probe", "train-step", "--model", os.path.join(model_dir, "unet"), "--inputs", inp, "--out", out,
            "--scheduler-config", os.path.join(model_dir, "scheduler", "scheduler_config.json"), "--lr", 1e-4)
    ours = load_file(out)
    assert abs(ours.pop("__loss__").item() - loss.item()) < 1e-6 * max(1.0, abs(loss.item()))
    grads = {k[len("__grad__."):]: ours.pop(k) for k in list(ours) if k.startswith("__grad__.")}
    ref = dict(unet.named_parameters())
    assert set(ours) == set(ref) and set(grads) == set(ref)
    for name, p in ref.items():
        scale = p.grad.abs().max().item()
        assert maxdiff(grads[name], p.grad) <= 1e-4 * scale + 1e-9, (name, maxdiff(grads[name], p.grad), scale)
    # The optimizer on its own: the same start, our gradients, PyTorch's AdamW.
    start_weights = copy.deepcopy(pipe.unet)
    for name, p in start_weights.named_parameters():
        p.grad = grads[name].clone()
    # lr 1e-4: Adam normalises the first step to about lr*sign(grad), so every weight moves by
    # ~1e-4, a hundred times the tolerance below, whatever its gradient size.
    torch.optim.AdamW(start_weights.parameters(), lr=1e-4, weight_decay=1e-2).step()
    moved = 0
    for name, p in start_weights.named_parameters():
        assert maxdiff(ours[name], p.detach()) < 1e-6, name
        moved += int((p.detach() - pipe.unet.state_dict()[name]).abs().max() > 5e-5)
    assert moved > len(ref) // 2  # the step really changed the weights


def test_text_encoder_train_step_matches_pytorch(tiny_sd, tmp_path):
    import copy

    model_dir, pipe = tiny_sd
    ids = pipe.tokenizer(["a red circle", "a blue star"], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    target = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(9))
    te = copy.deepcopy(pipe.text_encoder).train()
    opt = torch.optim.AdamW(te.parameters(), lr=1e-4, weight_decay=1e-2)
    loss = torch.nn.functional.mse_loss(te(ids).last_hidden_state, target)
    loss.backward()
    opt.step()
    inp = os.path.join(tmp_path, "te_in.safetensors")
    out = os.path.join(tmp_path, "te_out.safetensors")
    save_file({"input_ids": ids, "target": target}, inp)
    run_bin("sd_probe", "train-text-encoder", "--model", os.path.join(model_dir, "text_encoder"), "--inputs", inp,
            "--out", out, "--lr", 1e-4)
    ours = load_file(out)
    assert abs(ours.pop("__loss__").item() - loss.item()) < 1e-6
    ref = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in te.named_parameters()}
    assert set(ours) == set(ref)
    for name, p in ref.items():
        if p.grad is None or p.grad.abs().max() == 0:
            continue  # embedding rows of unused tokens: AdamW only decays them
        assert maxdiff(ours[name], p.detach()) < 1e-5, name


def copy_with_scheduler(src, dst, **changes):
    """Copy a diffusers model folder to dst with keys of its scheduler config changed."""
    import json
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "scheduler", "scheduler_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def tiny_sd_v(tiny_sd, tmp_path_factory):
    """The tiny model with a v-prediction scheduler config (as SD2.x ships)."""
    import shutil

    src, pipe = tiny_sd
    dst = str(tmp_path_factory.mktemp("tiny_sd_v"))
    shutil.rmtree(dst)
    copy_with_scheduler(src, dst, prediction_type="v_prediction")
    return dst, pipe


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_v_prediction_text_to_image(tiny_sd_v, tmp_path, scheduler):
    model_dir, pipe = tiny_sd_v
    ref = reference_images(pipe, model_dir, scheduler, ["a purple hexagon"], None, 6, 4.0, seed=77)
    out = os.path.join(tmp_path, "v.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "a purple hexagon", "--steps", 6,
            "--guidance", 4.0, "--seed", 77, "--scheduler", scheduler, "--out", out)
    from PIL import Image

    ours = np.asarray(Image.open(out)).astype(np.int16)
    assert np.abs(ours - (ref[0] * 255).round().astype(np.int16)).max() <= 1


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_zero_snr_ddim_few_steps(tiny_sd_v, tmp_path, spacing):
    """The toy teacher's sampler (zero terminal SNR, v-prediction) at 4 steps:
    with leading spacing it starts from pure noise at t = 751, with trailing at
    999, and both must match diffusers, since docs/toy-world.md compares them."""
    src, pipe = tiny_sd_v
    model_dir = os.path.join(tmp_path, "model")
    copy_with_scheduler(src, model_dir, rescale_betas_zero_snr=True, timestep_spacing=spacing, steps_offset=1)
    ref = reference_images(pipe, model_dir, "ddim", ["a large green star in the center"], None, 4, 7.5, seed=5)
    out = os.path.join(tmp_path, "z.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "a large green star in the center",
            "--steps", 4, "--guidance", 7.5, "--seed", 5, "--scheduler", "ddim", "--out", out)
    from PIL import Image

    ours = np.asarray(Image.open(out)).astype(np.int16)
    assert ref.std() > 0.01
    assert np.abs(ours - (ref[0] * 255).round().astype(np.int16)).max() <= 1


def test_bf16_on_cpu_runs(tiny_sd, tmp_path):
    """bf16 is a precision change, so only closeness to fp32 is asked, not parity."""
    model_dir, _ = tiny_sd
    a, b = os.path.join(tmp_path, "f32.png"), os.path.join(tmp_path, "bf16.png")
    for path, dtype in ((a, "fp32"), (b, "bf16")):
        run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "a red circle", "--steps", 4,
                "--seed", 3, "--dtype", dtype, "--out", path)
    from PIL import Image

    x = np.asarray(Image.open(a)).astype(np.float32)
    y = np.asarray(Image.open(b)).astype(np.float32)
    assert np.abs(x - y).mean() < 8  # mean error under 8/255


@pytest.fixture(scope="module")
def tiny_sd_guided(tiny_sd, tmp_path_factory):
    """The tiny pipeline with a guidance-conditioned UNet (time_cond_proj_dim, as LCM's and
    our cfg_distillation's), its cond_proj perturbed so that guidance changes the output."""
    import diffusers
    from sdtest.tiny_models import make_unet

    _, pipe = tiny_sd
    d = str(tmp_path_factory.mktemp("tiny_sd_guided"))
    guided = diffusers.StableDiffusionPipeline(
        unet=make_unet(0, time_cond_proj_dim=12), vae=pipe.vae, text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer, scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        w = guided.unet.time_embedding.cond_proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    guided.save_pretrained(d)
    return d, guided


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_unet_with_guidance_embedding(tiny_sd_guided, tmp_path, guidance):
    model_dir, pipe = tiny_sd_guided
    g = torch.Generator().manual_seed(9)
    sample, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(499, dtype=torch.int64)
    w = torch.full((2,), guidance - 1)
    cond = pipe.get_guidance_scale_embedding(w, embedding_dim=12)
    with torch.no_grad():
        ref = pipe.unet(sample, t, encoder_hidden_states=ctx, timestep_cond=cond).sample
        unguided = pipe.unet(sample, t, encoder_hidden_states=ctx).sample
    out = probe("unet", os.path.join(model_dir, "unet"),
                {"sample": sample, "timestep": t, "encoder_hidden_states": ctx, "guidance": w}, tmp_path)
    assert maxdiff(out["timestep_cond"], cond) < 1e-5
    assert maxdiff(out["sample"], ref) < ATOL
    assert maxdiff(ref, unguided) > 1e-2  # the guidance input matters


@pytest.mark.parametrize("guidance", [2.0, 7.5])
def test_guided_unet_text_to_image_is_one_pass_as_diffusers(tiny_sd_guided, tmp_path, guidance):
    from PIL import Image

    model_dir, pipe = tiny_sd_guided
    with torch.no_grad():
        ref = pipe(["a small red circle"], num_inference_steps=4, guidance_scale=guidance, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(21)).images[0]
    out = os.path.join(tmp_path, "g.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "a small red circle", "--steps", 4,
            "--guidance", guidance, "--seed", 21, "--out", out)
    ours = np.asarray(Image.open(out)).astype(np.int16)
    assert ref.std() > 0.01
    assert np.abs(ours - (ref * 255).round().astype(np.int16)).max() <= 1
    # A negative prompt has no pass to go to: refused, not silently dropped.
    r = run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "a small red circle", "--steps", 4,
                "--negative-prompt", "blurry", "--out", out, check=False)
    assert r.returncode != 0 and "CFG-distilled" in r.stderr and "negative" in r.stderr
