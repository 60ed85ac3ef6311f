"""LoRAs on our models: files made by peft/diffusers inside the test, in diffusers'
own (PEFT) layout and in kohya's, fused by `sdctl generate --lora` exactly as
diffusers' load_lora_weights + fuse_lora; and on a pruned model, the update cut
to the kept channels equals pruning the LoRA-fused unpruned model."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_bin
from test_prune import prune, rebuild

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_lora(pipe, out_dir, seed=0, unet_alpha=8, te_alpha=2):
    """A rank-4 LoRA on the UNet (attention, feed-forward, resnet convs) and the text
    encoder, random A and B (a trained LoRA's B is not zero either), saved by diffusers."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    ucfg = LoraConfig(r=4, lora_alpha=unet_alpha, target_modules=UNET_TARGETS, init_lora_weights=False)
    tcfg = LoraConfig(r=4, lora_alpha=te_alpha, target_modules=TE_TARGETS, init_lora_weights=False)
    unet.add_adapter(ucfg)
    # peft directly: transformers' add_adapter wants a newer peft than PyPI has.
    te = inject_adapter_in_model(tcfg, te)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (unet, te):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
        weight_name="peft.safetensors")
    return os.path.join(out_dir, "peft.safetensors")


def to_kohya(peft_path, out_path, alphas):
    """The same LoRA in kohya's layout: lora_unet_/lora_te_ flattened module names,
    lora_down/lora_up, and an alpha per module."""
    out = {}
    for k, v in load_file(peft_path).items():
        comp, rest = k.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        if comp == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        stem = ("lora_unet_" if comp == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        out[f"{stem}.alpha"] = torch.tensor(float(alphas[comp]))
    save_file(out, out_path)
    return out_path


def diffusers_images(model_dir, lora, scale, prompt, latents, steps=6):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(os.path.dirname(lora), weight_name=os.path.basename(lora))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    with torch.no_grad():
        im = pipe([prompt], num_inference_steps=steps, guidance_scale=7.5, latents=latents, output_type="np").images
    return (im[0] * 255).round().astype(np.int16), pipe


def ours(model_dir, tmp_path, name, prompt, latents, loras=(), steps=6):
    lat = tmp_path / f"{name}_latents.safetensors"
    save_file({"latents": latents}, str(lat))
    out = tmp_path / f"{name}.png"
    args = ["generate", "--model", model_dir, "--prompt", prompt, "--steps", steps, "--guidance", 7.5,
            "--scheduler", "ddim", "--latents", lat, "--out", out]
    for l in loras:
        args += ["--lora", l]
    r = run_bin("sdctl", *args)
    return np.asarray(Image.open(out)).astype(np.int16), r.stderr


PROMPT = "a small red circle at the top left"


@pytest.fixture(scope="module")
def lora_files(tiny_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    peft = make_lora(tiny_sd[1], str(d))
    kohya = to_kohya(peft, str(d / "kohya.safetensors"), {"unet": 8, "text_encoder": 2})
    return peft, kohya


def test_peft_and_kohya_loras_fuse_as_diffusers_does(tiny_sd, lora_files, tmp_path):
    model_dir, _ = tiny_sd
    peft, kohya = lora_files
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    base, _ = ours(model_dir, tmp_path, "base", PROMPT, latents)
    want, _ = diffusers_images(model_dir, peft, 0.7, PROMPT, latents)
    got, log = ours(model_dir, tmp_path, "peft", PROMPT, latents, [f"{peft}:0.7"])
    assert "(peft, scale 0.7)" in log and "keys unread" not in log, log
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - base).mean() > 5  # the LoRA changes the picture: the test can fail
    got_k, log = ours(model_dir, tmp_path, "kohya", PROMPT, latents, [f"{kohya}:0.7"])
    assert "(kohya, scale 0.7)" in log, log
    assert np.abs(got_k - want).max() <= 1
    want_k, _ = diffusers_images(model_dir, kohya, 0.7, PROMPT, latents)
    assert np.abs(got_k - want_k).max() <= 1


def test_lora_on_a_pruned_model_equals_pruning_the_fused_model(tiny_sd, lora_files, tmp_path):
    model_dir, _ = tiny_sd
    peft, _ = lora_files
    pruned = prune(tmp_path, model_dir, "  unet_ratio: 0.5\n  text_encoder_ratio: 0.5\n  vae_ratio: 0\n")
    pmap = json.load(open(os.path.join(pruned, "pruning_map.json")))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    got, log = ours(pruned, tmp_path, "pruned_lora", PROMPT, latents, [f"{peft}:1.0"])
    assert "cut to the pruned widths" in log, log
    # Reference: the unpruned model with the LoRA fused by diffusers, pruned with
    # the map, written into the pruned folder's architecture.
    _, fused = diffusers_images(model_dir, peft, 1.0, PROMPT, latents)
    _, target = diffusers_images(pruned, None, 1.0, PROMPT, latents)
    lora_modules = {k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in load_file(peft)}
    with torch.no_grad():
        for comp in ("unet", "text_encoder"):
            src = dict(getattr(fused, comp).state_dict())
            dst = getattr(target, comp).state_dict()
            entries = pmap["components"].get(comp, {}).get("tensors", {})
            for name in dst:
                module = name[:-len(".weight")] if name.endswith(".weight") else None
                bare = module.removeprefix("text_model.") if module else None
                if module is None or bare not in lora_modules and module not in lora_modules:
                    continue
                full = name if comp == "unet" or name.startswith("text_model.") else "text_model." + name
                entry = entries.get(full, {})
                dst[name].copy_(rebuild(src[name], entry) if entry else src[name])
    with torch.no_grad():
        im = target([PROMPT], num_inference_steps=6, guidance_scale=7.5, latents=latents, output_type="np").images
    want = (im[0] * 255).round().astype(np.int16)
    assert np.abs(got - want).max() <= 1
    plain, _ = ours(pruned, tmp_path, "pruned_plain", PROMPT, latents)
    assert np.abs(got - plain).mean() > 5  # the cut LoRA still changes the picture


def test_lora_errors_name_the_tensor_and_both_shapes(tiny_sd, lora_files, tmp_path):
    model_dir, _ = tiny_sd
    peft, _ = lora_files
    w = load_file(peft)
    key = next(k for k in w if k.startswith("unet.") and k.endswith("to_q.lora_A.weight"))
    w[key] = torch.randn(4, w[key].shape[1] + 3)
    bad = str(tmp_path / "bad.safetensors")
    save_file(w, bad)
    r = run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "x", "--steps", 2, "--lora", bad,
                "--out", tmp_path / "x.png", check=False)
    assert r.returncode != 0
    assert "to_q.weight is [" in r.stderr and "but the update is [" in r.stderr, r.stderr
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "none.safetensors"))
    r = run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "x", "--steps", 2,
                "--lora", tmp_path / "none.safetensors", "--out", tmp_path / "x.png", check=False)
    assert r.returncode != 0 and "maps onto this model" in r.stderr, r.stderr
    r = run_bin("sdctl", "generate", "--model", model_dir, "--prompt", "x", "--lora", f"{peft}:abc",
                "--out", tmp_path / "x.png", check=False)
    assert r.returncode != 0


def test_sdserve_applies_a_lora_as_sdctl_does(tiny_sd, lora_files, tmp_path):
    from test_serve import Server, assert_same_image, png_array, reference

    model_dir, _ = tiny_sd
    peft, _ = lora_files
    want = reference(model_dir, tmp_path, PROMPT, 5, 7, extra=("--lora", f"{peft}:0.7"))
    (tmp_path / "plain").mkdir()
    plain = reference(model_dir, tmp_path / "plain", PROMPT, 5, 7)
    with Server(model_dir, "--lora", f"{peft}:0.7") as s:
        code, _, r = s.post({"prompt": PROMPT, "steps": 5, "seed": 7})
    assert code == 200, r
    got = png_array(r["data"][0]["b64_json"])
    assert_same_image(got, want[0])
    assert np.abs(got - plain[0]).mean() > 5
