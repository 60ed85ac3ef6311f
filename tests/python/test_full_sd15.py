"""The full SD1.5 UNet configuration (random weights, ~860M parameters) loads and matches diffusers."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_bin
from sdtest.tiny_models import SD15_UNET, write_sd15_random


def test_sd15_unet_loads_and_matches(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n_params < 866e6, n_params
    unet_dir = os.path.join(tmp_path, "unet")
    unet.save_pretrained(unet_dir, max_shard_size="1GB")  # sharded: the index.json path is exercised too
    assert os.path.exists(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.json"))
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=ctx).sample
    del unet
    inp = os.path.join(tmp_path, "in.safetensors")
    out = os.path.join(tmp_path, "out.safetensors")
    save_file({"sample": sample, "timestep": t, "encoder_hidden_states": ctx}, inp)
    run_bin("sd_probe", "unet", "--model", unet_dir, "--inputs", inp, "--out", out)
    ours = load_file(out)["sample"]
    assert (ours - ref).abs().max().item() < 1e-4


def test_sd15_prunes_at_the_seed_ratios_and_diffusers_runs_it_as_we_do(tiny_sd, tmp_path):
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from test_finetune_stage import run_stage, write_stage_job
    from test_parity import probe

    src = str(tmp_path / "sd15")
    write_sd15_random(src, tiny_sd[0])
    job = write_stage_job(tmp_path, "prune", src, "prune", "", seed=0)
    out = str(tmp_path / "pruned")
    run_stage(job, str(tmp_path / "ckpt"), out)
    report = json.load(open(os.path.join(out, "prune_report.json")))["components"]
    # 30% of every UNet block in whole GroupNorm groups (32 groups of 10, 20, 40: 7, 14, 28 kept).
    assert json.load(open(os.path.join(out, "unet", "config.json")))["block_out_channels"] == [224, 448, 896, 896]
    assert [lv["ratio_reached"] for lv in report["unet"]["levels"]] == pytest.approx([0.3] * 4)
    assert all(g["groups_not_subsets"] == 0 for g in report["unet"]["group_norms"].values())
    assert json.load(open(os.path.join(out, "vae", "config.json")))["block_out_channels"] == [96, 192, 416, 416]
    assert json.load(open(os.path.join(out, "text_encoder", "config.json")))["intermediate_size"] == 2304

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    assert sum(p.numel() for p in unet.parameters()) == report["unet"]["parameters"]["after"]
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    with torch.no_grad():
        ref = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    del unet
    assert (probe("unet", os.path.join(out, "unet"), inputs, tmp_path)["sample"] - ref).abs().max().item() < 1e-4

    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae")).eval()
    latents = torch.randn(1, 4, 8, 8, generator=g)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        dec = vae.decode(latents).sample
        mean = vae.encode(images).latent_dist.mean
    ours = probe("vae", os.path.join(out, "vae"), {"images": images, "latents": latents}, tmp_path)
    assert (ours["decoded"] - dec).abs().max().item() < 1e-4
    assert (ours["mean"] - mean).abs().max().item() < 1e-4

    te = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder")).eval()
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    with torch.no_grad():
        hidden = te(ids).last_hidden_state
    ours = probe("text-encoder", os.path.join(out, "text_encoder"), {"input_ids": ids}, tmp_path)
    assert (ours["last_hidden_state"] - hidden).abs().max().item() < 1e-4
