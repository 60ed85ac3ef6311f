"""The full SD1.5 UNet configuration (random weights, ~860M parameters) loads and matches diffusers."""
import os

import torch
from safetensors.torch import load_file, save_file

from conftest import run_bin

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


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
