"""Inference options against their references: token merging against the tomesd package on
diffusers, attention slicing and VAE tiling against diffusers' own (tiny random models, fp32, CPU)."""
import os

import numpy as np
import pytest
import torch

from conftest import run_bin
from test_parity import probe

ATOL = 1e-4


def unet_inputs(batch, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, h, w, generator=g),
            "timestep": torch.tensor(321),
            "encoder_hidden_states": torch.randn(batch, 77, 32, generator=g)}


def tomesd_unet(pipe, inputs, seed=0, **tome_args):
    import tomesd

    tomesd.apply_patch(pipe.unet, **tome_args)
    try:
        # tomesd forks the global generator at its first merge: seeding it here gives the
        # stream our generator, seeded with the same number, draws.
        torch.manual_seed(seed)
        with torch.no_grad():
            return pipe.unet(inputs["sample"], inputs["timestep"],
                             encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    finally:
        tomesd.remove_patch(pipe.unet)


TOME_CASES = {
    # tomesd's defaults without random destinations: the parity point
    "default-norand": (dict(ratio=0.5, use_rand=False), ["--tome", 0.5, "--tome-no-rand"], 2, 16, 16),
    # every merge site, the mid block too, and the largest ratio the 2x2 windows allow
    "all-sites": (dict(ratio=0.75, max_downsample=2, use_rand=False, merge_crossattn=True, merge_mlp=True),
                  ["--tome", 0.75, "--tome-max-downsample", 2, "--tome-no-rand", "--tome-merge-crossattn",
                   "--tome-merge-mlp"], 2, 16, 16),
    # a grid the windows do not tile (13x11): the leftover row and column stay sources
    "odd-size": (dict(ratio=0.5, max_downsample=2, use_rand=False), ["--tome", 0.5, "--tome-max-downsample", 2,
                                                                    "--tome-no-rand"], 2, 13, 11),
    # 3x1 windows
    "strides": (dict(ratio=0.6, sx=3, sy=1, use_rand=False), ["--tome", 0.6, "--tome-sx", 3, "--tome-sy", 1,
                                                            "--tome-no-rand"], 2, 16, 16),
    # random destinations: the same generator stream as tomesd's when both start from one seed
    "random": (dict(ratio=0.5), ["--tome", 0.5], 2, 16, 16),
    # an odd batch turns randomness off (tomesd's rule)
    "odd-batch": (dict(ratio=0.5), ["--tome", 0.5], 1, 16, 16),
}


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "channels_last+fused_qkv"])
@pytest.mark.parametrize("case", list(TOME_CASES))
def test_tome_unet_matches_tomesd(tiny_sd, tmp_path, case, optimized):
    model_dir, pipe = tiny_sd
    tome_args, flags, batch, h, w = TOME_CASES[case]
    inputs = unet_inputs(batch, h, w)
    ref = tomesd_unet(pipe, inputs, **tome_args)
    with torch.no_grad():
        plain = pipe.unet(inputs["sample"], inputs["timestep"],
                          encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    # the comparison means something: merging changes the output well beyond the tolerance
    assert (ref - plain).abs().max() > 100 * ATOL
    out = probe("unet", os.path.join(model_dir, "unet"), inputs, tmp_path, *flags,
                *(["--optimized"] if optimized else []))
    assert (out["sample"] - ref).abs().max().item() < ATOL


def test_tome_random_destinations_depend_on_the_seed_only(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    inputs = unet_inputs(2, 16, 16)
    a = probe("unet", os.path.join(model_dir, "unet"), inputs, tmp_path, "--tome", 0.5)["sample"]
    b = probe("unet", os.path.join(model_dir, "unet"), inputs, tmp_path, "--tome", 0.5)["sample"]
    fixed = probe("unet", os.path.join(model_dir, "unet"), inputs, tmp_path, "--tome", 0.5, "--tome-no-rand")
    assert torch.equal(a, b)
    assert (a - fixed["sample"]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("slice_flag", ["1", "3", "auto", "max"])
def test_attention_slicing_matches_diffusers(tiny_sd, tmp_path, slice_flag):
    model_dir, pipe = tiny_sd
    inputs = unet_inputs(2, 16, 16, seed=4)
    with torch.no_grad():
        ref = pipe.unet(inputs["sample"], inputs["timestep"],
                        encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    out = probe("unet", os.path.join(model_dir, "unet"), inputs, tmp_path, "--attention-slice", slice_flag)
    assert (out["sample"] - ref).abs().max().item() < ATOL


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
def test_attention_backends_match_diffusers(tiny_sd, tmp_path, backend):
    """Each CPU kernel LibTorch has, called directly, gives diffusers' UNet output; a sliced
    attention on it too."""
    model_dir, pipe = tiny_sd
    inputs = unet_inputs(2, 16, 16, seed=6)
    with torch.no_grad():
        ref = pipe.unet(inputs["sample"], inputs["timestep"],
                        encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    for extra in ([], ["--attention-slice", "1"]):
        out = probe("unet", os.path.join(model_dir, "unet"), inputs, tmp_path, "--sdpa", backend, *extra)
        assert (out["sample"] - ref).abs().max().item() < ATOL, extra


def test_generate_with_each_cpu_attention_backend_is_the_same_picture(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    common = ["--prompt", "a green square", "--steps", 3, "--seed", 3]
    pics = {b: sdctl_png(model_dir, tmp_path, b, *common, "--sdpa", b) for b in ("auto", "math", "flash")}
    assert np.abs(pics["math"] - pics["auto"]).max() <= 1
    assert np.abs(pics["flash"] - pics["auto"]).max() <= 1


def test_cuda_graphs_fall_back_to_eager_off_cuda(tiny_sd, tmp_path):
    """--cuda-graphs is accepted everywhere; on the CPU the step runs eagerly (same picture)
    and the benchmark says no graph was replayed."""
    model_dir, _ = tiny_sd
    common = ["--prompt", "a blue circle", "--steps", 2, "--seed", 5]
    eager = sdctl_png(model_dir, tmp_path, "eager", *common)
    graphs = sdctl_png(model_dir, tmp_path, "graphs", *common, "--cuda-graphs")
    assert np.array_equal(eager, graphs)
    import json

    r = run_bin("bench_sd", "unet", "--model", os.path.join(model_dir, "unet"), "--size", 16, "--iters", 1,
                "--cuda-graphs")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["inference"]["cuda_graphs"] is True and out["cuda_graph_replayed"] is False


def test_vae_tiling_matches_diffusers(tiny_sd, tmp_path):
    """The tiny VAE's sample_size is 32, so its tiles are 16x16 latents / 32x32 pixels: 40x24
    latents make a 3x2 grid of overlapping tiles with a partial last row and column."""
    model_dir, pipe = tiny_sd
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 40, 24, generator=g)
    images = torch.rand(1, 3, 80, 48, generator=g) * 2 - 1
    vae = pipe.vae
    with torch.no_grad():
        whole = vae.decode(latents).sample
        vae.enable_tiling()
        try:
            dec = vae.decode(latents).sample
            post = vae.encode(images).latent_dist
        finally:
            vae.disable_tiling()
    assert (dec - whole).abs().max() > 100 * ATOL  # tiling is not a no-op at this size
    for flags in ([], ["--optimized"]):
        out = probe("vae", os.path.join(model_dir, "vae"), {"images": images, "latents": latents}, tmp_path,
                    "--vae-tiling", *flags)
        assert (out["decoded"] - dec).abs().max().item() < ATOL
        assert (out["mean"] - post.mean).abs().max().item() < ATOL
        assert (out["logvar"] - post.logvar).abs().max().item() < ATOL


def sdctl_png(model_dir, tmp_path, name, *flags):
    from PIL import Image

    png = str(tmp_path / f"{name}.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--out", png, *map(str, flags))
    return np.asarray(Image.open(png)).astype(np.int16)


def test_generate_with_tome_and_vae_tiling_matches_diffusers_with_tomesd(tiny_sd, tmp_path):
    """The whole pipeline as a user runs it: `sdctl generate --tome 0.5 --vae-tiling` against
    StableDiffusionPipeline with tomesd.apply_patch and enable_vae_tiling, random destinations
    included (both generators start from the generation seed), within 1/255."""
    import tomesd

    model_dir, pipe = tiny_sd
    prompt, seed, h, w = "a red circle on a blue background", 11, 80, 48
    tomesd.apply_patch(pipe, ratio=0.5)
    pipe.vae.enable_tiling()
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            ref = pipe([prompt], num_inference_steps=4, guidance_scale=7.5, height=h, width=w, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    finally:
        tomesd.remove_patch(pipe)
        pipe.vae.disable_tiling()
    ref = (ref * 255).round().astype(np.int16)
    common = ["--prompt", prompt, "--steps", 4, "--guidance", 7.5, "--seed", seed, "--height", h, "--width", w]
    ours = sdctl_png(model_dir, tmp_path, "tome_tiled", *common, "--tome", 0.5, "--vae-tiling")
    plain = sdctl_png(model_dir, tmp_path, "plain", *common)
    assert np.abs(ours - ref).max() <= 1
    assert np.abs(plain - ref).max() > 1  # the options changed the picture; the match is theirs


@pytest.mark.parametrize("flags, message", [
    (["--tome", 0.8], "token merging ratio must be in (0, 0.75] for sx=2 sy=2, got 0.8"),
    (["--tome", 0.5, "--tome-max-downsample", 3], "max_downsample must be 1, 2, 4 or 8, got 3"),
    (["--tome-sx", 3], "--tome-sx configures token merging: give --tome RATIO too"),
    (["--tome", 0.5, "--tome-sy", 0], "strides must be >= 1, got sx=2 sy=0"),
    (["--attention-slice", "-2"], "--attention-slice must be a count >= 0, auto or max, got -2"),
    (["--attention-slice", "half"], "attention-slice"),
    (["--sdpa", "xformers"], '--sdpa: attention backend "xformers" is not one of auto, math, flash, efficient, cudnn'),
    (["--sdpa", "efficient"], "attention backend efficient runs on CUDA only; this run is on cpu"),
    (["--sdpa", "cudnn"], "attention backend cudnn runs on CUDA only"),
    (["--cuda-graphs", "--tome", 0.5], "CUDA graphs and token merging do not combine"),
])
def test_bad_inference_flags_are_named(tiny_sd, tmp_path, flags, message):
    model_dir, _ = tiny_sd
    r = run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "x", "--steps", 1,
                "--out", str(tmp_path / "x.png"), *map(str, flags), check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()
