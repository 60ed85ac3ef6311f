"""Bad models and bad flags give a clear error naming what is wrong and where."""
import json
import os
import shutil

import pytest

from conftest import run_bin


@pytest.fixture()
def model_copy(tiny_sd, tmp_path):
    src, _ = tiny_sd
    dst = os.path.join(tmp_path, "model")
    shutil.copytree(src, dst)
    return dst


def generate(model, tmp_path, *extra):
    return run_bin("sdctl", "generate", "--model", model, "--prompt", "x", "--steps", 2,
                   "--out", os.path.join(tmp_path, "o.png"), *extra, check=False)


def test_config_that_does_not_fit_checkpoint(model_copy, tmp_path):
    cfg_path = os.path.join(model_copy, "unet", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["block_out_channels"] = [32, 96]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    r = generate(model_copy, tmp_path)
    assert r.returncode == 1
    assert "unet/diffusion_pytorch_model.safetensors does not fit its config" in r.stderr
    assert 'tensor "down_blocks.1.resnets.0.conv1.weight" has shape [64, 32, 3, 3]' in r.stderr
    assert "implies [96, 32, 3, 3]" in r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "o.png"))


def test_truncated_weights(model_copy, tmp_path):
    path = os.path.join(model_copy, "vae", "diffusion_pytorch_model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    r = generate(model_copy, tmp_path)
    assert r.returncode == 1
    assert "malformed safetensors file" in r.stderr and "vae/diffusion_pytorch_model.safetensors" in r.stderr
    assert "truncated" in r.stderr


def test_bad_config_value(model_copy, tmp_path):
    path = os.path.join(model_copy, "text_encoder", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["num_attention_heads"] = 5
    with open(path, "w") as f:
        json.dump(cfg, f)
    r = generate(model_copy, tmp_path)
    assert 'text_encoder/config.json: key "num_attention_heads" must divide hidden_size, got 5' in r.stderr


def test_unsupported_component_class(model_copy, tmp_path):
    path = os.path.join(model_copy, "model_index.json")
    with open(path) as f:
        idx = json.load(f)
    idx["unet"] = ["diffusers", "UNet2DModel"]
    with open(path, "w") as f:
        json.dump(idx, f)
    r = generate(model_copy, tmp_path)
    assert 'model_index.json: key "unet" names class UNet2DModel, which this build cannot load' in r.stderr


def test_not_a_model_folder(tmp_path):
    r = generate(str(tmp_path), tmp_path)
    assert r.returncode == 1 and "not a diffusers model folder (no model_index.json)" in r.stderr


@pytest.mark.parametrize("flags,message", [
    (["--guidance", "abc"], "--guidance needs a number"),
    (["--scheduler", "lms"], 'unknown scheduler "lms"'),
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--dtype", "fp16"], "--dtype fp16 needs --device cuda"),
    (["--height", "30"], "multiples of 8"),
])
def test_bad_flags(tiny_sd, tmp_path, flags, message):
    r = generate(tiny_sd[0], tmp_path, *flags)
    assert r.returncode != 0 and message in r.stderr, r.stderr
