"""prune: structured pruning of the UNet, text encoder and VAE into standard diffusers
components that diffusers loads from their config.json alone, with a pruning map that
says exactly which channels each tensor kept."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_bin
from test_finetune_stage import run_stage, write_stage_job
from test_parity import assert_diffusers_samples_as_sdctl, maxdiff, probe

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


def prune(tmp_path, model_dir, section="", name="prune"):
    job = write_stage_job(tmp_path, name, model_dir, "prune", section, seed=0)
    out = str(tmp_path / f"{name}_out")
    run_stage(job, str(tmp_path / f"{name}_ckpt"), out)
    return out


def weights(folder, component):
    w = load_file(os.path.join(folder, component, WEIGHTS[component]))
    # transformers 5 writes the text encoder without "text_model."; the map uses the full names.
    return {(k if k.startswith("text_model.") or component != "text_encoder" else "text_model." + k): v
            for k, v in w.items()}


def rebuild(original, entry):
    """The pruned tensor from the unpruned one and its pruning_map entry."""
    t = original
    for axis, kept in entry.items():
        if axis.isdigit():
            t = t.index_select(int(axis), torch.tensor(kept))
    return t * entry.get("scale", 1.0)


def test_pruned_folder_is_standard_diffusers_and_the_map_is_exact(tiny_sd, tmp_path):
    import diffusers
    import transformers

    model_dir, _ = tiny_sd
    out = prune(tmp_path, model_dir)
    report = json.load(open(os.path.join(out, "prune_report.json")))["components"]
    pmap = json.load(open(os.path.join(out, "pruning_map.json")))
    assert pmap["source"] == os.path.abspath(model_dir)

    # Configs: one width per block, quantised by the GroupNorm groups (16 groups: 32 -> 16 is
    # the nearest whole-group width to 70%, 64 -> 48); the time embedding keeps its width.
    unet_cfg = json.load(open(os.path.join(out, "unet", "config.json")))
    assert unet_cfg["block_out_channels"] == [16, 48] and unet_cfg["time_embedding_dim"] == 128
    assert [lv["ratio_reached"] for lv in report["unet"]["levels"]] == [0.5, 0.25]
    vae_cfg = json.load(open(os.path.join(out, "vae", "config.json")))
    assert vae_cfg["block_out_channels"] == [32, 48] and vae_cfg["latent_channels"] == 4
    assert json.load(open(os.path.join(out, "text_encoder", "config.json")))["intermediate_size"] == 28

    # diffusers and transformers load each component from its config alone, at the reported size.
    u = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    v = diffusers.AutoencoderKL.from_pretrained(os.path.join(out, "vae"))
    te = transformers.CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
    for name, m in (("unet", u), ("vae", v), ("text_encoder", te)):
        assert sum(p.numel() for p in m.parameters()) == report[name]["parameters"]["after"], name
    # Every pruned tensor is the unpruned one cut to the map's indices (queries also rescaled
    # by sqrt(new head dim / old)); everything else is untouched.
    for component in ("unet", "vae", "text_encoder"):
        before, after = weights(model_dir, component), weights(out, component)
        entries = pmap["components"][component]["tensors"]
        assert set(before) == set(after), component
        for k, t in after.items():
            e = entries.get(k)
            if e is not None and "refit" in e:
                continue
            expect = rebuild(before[k], e) if e else before[k]
            assert expect.shape == t.shape, (component, k)
            assert torch.allclose(expect, t, atol=1e-7, rtol=1e-6), (component, k)
        assert any("scale" in e for e in entries.values()) == (component != "text_encoder")

    # The refitted time embedding: the reported error is the one diffusers' modules give.
    teacher = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"))
    t = torch.arange(1000)
    with torch.no_grad():
        e_old = teacher.time_embedding(teacher.time_proj(t))
        e_new = u.time_embedding(u.time_proj(t))
    err = float((e_new - e_old).norm() / e_old.norm())
    assert abs(err - report["unet"]["time_embedding_refit"]["time_embedding_relative_error"]) < 1e-4

    # The C++ pipeline samples it as diffusers' StableDiffusionPipeline does.
    assert_diffusers_samples_as_sdctl(out, tmp_path, "a red square", steps=3, guidance=5.0, seed=1)


def test_per_level_ratios_keep_a_level_whole_and_its_time_embedding_exact(tiny_sd, tmp_path):
    """A level whose 2-channel groups can only lose none or half is kept whole by a list of
    ratios; block_out_channels[0] unchanged leaves the time embedding untouched (no refit)."""
    from diffusers import UNet2DConditionModel

    model_dir, _ = tiny_sd
    out = prune(tmp_path, model_dir, "  unet_ratio: [0, 0.3]\n  text_encoder_ratio: 0\n  vae_ratio: 0\n")
    report = json.load(open(os.path.join(out, "prune_report.json")))["components"]["unet"]
    assert [lv["kept"] for lv in report["levels"]] == [32, 48]
    assert [lv["ratio_asked"] for lv in report["levels"]] == [0, 0.3]
    assert report["time_embedding_refit"].startswith("none")
    pmap = json.load(open(os.path.join(out, "pruning_map.json")))["components"]["unet"]
    assert pmap["ratio"] == [0, 0.3]
    assert not any(k.startswith("time_embedding.") for k in pmap["tensors"])
    before, after = weights(model_dir, "unet"), weights(out, "unet")
    for k in ("time_embedding.linear_1.weight", "conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"):
        assert torch.equal(before[k], after[k]), k
    u = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(1, 77, 32, generator=g)}
    ours = probe("unet", os.path.join(out, "unet"), inputs, tmp_path)
    with torch.no_grad():
        ref = u(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    assert maxdiff(ours["sample"], ref) < 1e-4


def test_l1_removes_the_weakest_neurons_and_an_exact_prune_keeps_the_function(tiny_sd, tmp_path):
    """Text-encoder MLP neurons whose weights are zero are the ones removed, and with only
    those removed the encoder's outputs are unchanged."""
    import shutil

    from transformers import CLIPTextModel

    model_dir, pipe = tiny_sd
    src = str(tmp_path / "zeroed")
    shutil.copytree(model_dir, src)
    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"))
    rng = np.random.default_rng(0)
    dead = {}
    with torch.no_grad():
        body = te.text_model if hasattr(te, "text_model") else te  # transformers 4 / 5
        for i, layer in enumerate(body.encoder.layers):
            d = sorted(rng.choice(37, 9, replace=False).tolist())  # 37 -> 28 neurons at 25%
            layer.mlp.fc1.weight[d] = 0
            layer.mlp.fc1.bias[d] = 0
            layer.mlp.fc2.weight[:, d] = 0
            dead[i] = d
    te.save_pretrained(os.path.join(src, "text_encoder"))
    out = prune(tmp_path, src, "  unet_ratio: 0\n  vae_ratio: 0\n")
    tensors = json.load(open(os.path.join(out, "pruning_map.json")))["components"]["text_encoder"]["tensors"]
    for i, d in dead.items():
        kept = tensors[f"text_model.encoder.layers.{i}.mlp.fc1.weight"]["0"]
        assert kept == [k for k in range(37) if k not in d]
    # Components at ratio 0 are the input's, byte for byte.
    for c in ("unet", "vae"):
        assert open(os.path.join(out, c, WEIGHTS[c]), "rb").read() == open(os.path.join(src, c, WEIGHTS[c]), "rb").read()
    ids = pipe.tokenizer(["a red square", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pruned = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
    with torch.no_grad():
        a, b = te(ids).last_hidden_state, pruned(ids).last_hidden_state
    assert maxdiff(a, b) < 1e-5
    ours = probe("text-encoder", os.path.join(out, "text_encoder"), {"input_ids": ids}, tmp_path)
    assert maxdiff(ours["last_hidden_state"], b) < 1e-4


def test_a_cfg_distilled_unet_keeps_its_guidance_input(tmp_path):
    """cond_proj adds into the sinusoidal features that block_out_channels[0] sizes: it is
    refitted with linear_1, and the pruned UNet still reads guidance as diffusers does."""
    from diffusers import UNet2DConditionModel

    from sdtest.tiny_models import make_pipeline, make_unet

    model_dir = str(tmp_path / "guided")
    make_pipeline(model_dir)
    guided = make_unet(0, time_cond_proj_dim=12)
    with torch.no_grad():  # guidance that matters
        w = guided.time_embedding.cond_proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 0.5)
    guided.save_pretrained(os.path.join(model_dir, "unet"))
    out = prune(tmp_path, model_dir, "  text_encoder_ratio: 0\n  vae_ratio: 0\n")
    report = json.load(open(os.path.join(out, "prune_report.json")))["components"]["unet"]
    assert 0 <= report["time_embedding_refit"]["cond_proj_relative_error"] < 1
    u = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"))
    assert u.config.time_cond_proj_dim == 12
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor(300),
              "encoder_hidden_states": torch.randn(2, 77, 32, generator=g), "guidance": torch.tensor([0.0, 6.5])}
    ours = probe("unet", os.path.join(out, "unet"), inputs, tmp_path)
    with torch.no_grad():
        ref = u(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                timestep_cond=ours["timestep_cond"]).sample
    assert maxdiff(ours["sample"], ref) < 1e-4


@pytest.mark.parametrize("section, message", [
    ("  unet_ratio: 0.8\n", "unet: ratio 0.8 would leave down_blocks.0's 16 GroupNorm groups of 2 channels empty"),
    ("  vae_ratio: 0.9\n  unet_ratio: 0\n", "vae: ratio 0.9 would leave block_out_channels[0]'s 16 GroupNorm groups"),
    ("  unet_ratio: [0, 0.3, 0.3]\n", "unet: 3 ratios given, but block_out_channels has 2 levels"),
])
def test_a_ratio_that_empties_a_group_is_refused_naming_the_block(tiny_sd, tmp_path, section, message):
    job = write_stage_job(tmp_path, "bad", tiny_sd[0], "prune", section, seed=0)
    r = run_stage(job, str(tmp_path / "ckpt"), str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "out" / "unet")


def test_unknown_config_and_bad_ratio_are_refused(tiny_sd, tmp_path):
    import shutil

    src = str(tmp_path / "odd")
    shutil.copytree(tiny_sd[0], src)
    path = os.path.join(src, "unet", "config.json")
    cfg = json.load(open(path))
    cfg["mid_block_type"] = "UNetMidBlock2DSimpleCrossAttn"
    json.dump(cfg, open(path, "w"))
    job = write_stage_job(tmp_path, "odd", src, "prune", "", seed=0)
    r = run_stage(job, str(tmp_path / "ckpt"), str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "unet/config.json" in r.stderr and "mid_block_type" in r.stderr, r.stderr

    job = write_stage_job(tmp_path, "ratio", tiny_sd[0], "prune", "  unet_ratio: 1.0\n", seed=0)
    r = run_bin("sdctl", "submit", job, check=False)
    assert r.returncode != 0 and "prune.unet_ratio" in r.stderr and "out of range" in r.stderr, r.stderr


def kd_job(tmp_path, model_dir, name, steps=6, batch=2, lr="1.0e-3", extra=""):
    return write_stage_job(tmp_path, name, model_dir, "finetune", f"  steps: {steps}\n  lr: {lr}\n{extra}",
                           seed=3, batch=batch)


def unet_error(unet_dir, reference, inputs):
    from diffusers import UNet2DConditionModel

    u = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    with torch.no_grad():
        out = u(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["ctx"]).sample
    return float((out - reference).pow(2).mean())


@pytest.fixture(scope="module")
def pruned_tiny(tiny_sd, tmp_path_factory):
    return prune(tmp_path_factory.mktemp("pruned"), tiny_sd[0])


def test_kd_finetune_recovers_each_pruned_component_toward_the_unpruned(tiny_sd, pruned_tiny, tmp_path):
    import diffusers
    from PIL import Image
    from transformers import CLIPTextModel

    model_dir, pipe = tiny_sd
    out = str(tmp_path / "ft")
    # The distillation terms alone: a random teacher's predictions are not the noise, so the
    # task loss would pull elsewhere (the toy world measures the whole objective).
    r = run_stage(kd_job(tmp_path, pruned_tiny, "kd", steps=30, extra="  task_weight: 0\n"), str(tmp_path / "ckpt"), out)
    assert f"distilling from {os.path.abspath(model_dir)}; text encoder recovers; VAE decoder recovers" in r.stdout
    # The same pruned architecture, every component trained, the map carried on (LoRA report).
    for c in ("vae", "text_encoder"):
        assert json.load(open(os.path.join(out, c, "config.json"))) == \
            json.load(open(os.path.join(pruned_tiny, c, "config.json")))
    a, b = (json.load(open(os.path.join(d, "unet", "config.json"))) for d in (out, pruned_tiny))
    assert all(a[k] == b[k] for k in ("block_out_channels", "time_embedding_dim", "attention_head_dim"))
    assert open(os.path.join(out, "pruning_map.json")).read() == open(os.path.join(pruned_tiny, "pruning_map.json")).read()

    # Distilled toward the teacher on inputs like its training ones: the data's latents, noised.
    import glob

    g = torch.Generator().manual_seed(5)
    files = sorted(glob.glob(str(tmp_path / "data" / "*.png")))
    x = torch.tensor(np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32)), np.float32) / 127.5 - 1
                               for f in files])).permute(0, 3, 1, 2)
    ids = pipe.tokenizer(["a red square", "a blue circle", ""] * 2, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = pipe.text_encoder(ids).last_hidden_state
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        t = torch.randint(0, 1000, (len(files),), generator=g)
        sample = pipe.scheduler.add_noise(latents, torch.randn(latents.shape, generator=g), t)
        inputs = {"sample": sample, "timestep": t, "ctx": ctx}
        ref = pipe.unet(sample, t, encoder_hidden_states=ctx).sample
    before = unet_error(os.path.join(pruned_tiny, "unet"), ref, inputs)
    after = unet_error(os.path.join(out, "unet"), ref, inputs)
    assert after < 0.7 * before, (before, after)

    def te_error(d):
        with torch.no_grad():
            return float((CLIPTextModel.from_pretrained(d)(ids).last_hidden_state - ctx).pow(2).mean())
    assert te_error(os.path.join(out, "text_encoder")) < 0.8 * te_error(os.path.join(pruned_tiny, "text_encoder"))

    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        goal = pipe.vae.decode(latents).sample

    def vae_error(d):
        with torch.no_grad():
            return float((diffusers.AutoencoderKL.from_pretrained(d).decode(latents).sample - goal).pow(2).mean())
    assert vae_error(os.path.join(out, "vae")) < 0.8 * vae_error(os.path.join(pruned_tiny, "vae"))

    # A fine-tuned pruned folder is as standard as a pruned one.
    assert_diffusers_samples_as_sdctl(out, tmp_path, "a red square", steps=3, guidance=5.0, seed=1)


def test_kd_finetune_resumes_exactly_and_two_workers_match_one(pruned_tiny, tmp_path):
    from test_finetune_stage import run_two_ranks

    job = kd_job(tmp_path, pruned_tiny, "kd", steps=5)
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    r = run_stage(job, ckpt, resumed, stop_at=3, check=False)
    assert r.returncode != 0 and "stopped at step 3" in r.stderr
    r = run_stage(job, ckpt, resumed)
    assert "step 3/5" in r.stdout and "step 2/5" not in r.stdout
    for c in ("unet", "vae", "text_encoder"):
        a, b = weights(full, c), weights(resumed, c)
        for k in a:
            assert torch.equal(a[k], b[k]), (c, k)

    single, dp = str(tmp_path / "single"), str(tmp_path / "dp")
    run_stage(kd_job(tmp_path, pruned_tiny, "b2", steps=4, batch=2, lr="1.0e-5"), str(tmp_path / "c1"), single)
    run_two_ranks(kd_job(tmp_path, pruned_tiny, "b1", steps=4, batch=1, lr="1.0e-5"), str(tmp_path / "c2"), dp)
    # Adam's first steps are about lr * sign(grad): a near-zero gradient whose float noise
    # differs between one and two ranks moves its weight by up to 2 lr the other way. So the
    # check is on all weights together: a wrong average (or a rank's samples lost) would move
    # most of them apart, float noise moves a few hundredths of a percent.
    for c in ("unet", "vae", "text_encoder"):
        a, b, start = weights(single, c), weights(dp, c), weights(pruned_tiny, c)
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        moved = torch.cat([(a[k] - start[k]).abs().flatten() for k in a])
        assert float((diff > 5e-6).float().mean()) < 1e-3, c
        assert float(diff.mean()) < 1e-3 * float(moved.mean()), c


def test_kd_teacher_and_map_errors_name_what_is_wrong(pruned_tiny, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(pruned_tiny, bad)
    path = os.path.join(bad, "pruning_map.json")
    m = json.load(open(path))
    m["components"]["unet"]["block_outputs"]["up_blocks.1"] = list(range(20))
    json.dump(m, open(path, "w"))
    r = run_stage(kd_job(tmp_path, bad, "map"), str(tmp_path / "c1"), str(tmp_path / "o1"), check=False)
    assert r.returncode != 0 and "pruning_map.json does not fit these models: up_blocks.1 keeps 20 channels" in r.stderr, r.stderr

    m["source"] = str(tmp_path / "gone")
    json.dump(m, open(path, "w"))
    r = run_stage(kd_job(tmp_path, bad, "gone"), str(tmp_path / "c2"), str(tmp_path / "o2"), check=False)
    assert r.returncode != 0 and "the unpruned model pruning_map.json names" in r.stderr and "gone" in r.stderr, r.stderr
    # teacher: none is plain fine-tuning of the pruned UNet alone.
    r = run_stage(kd_job(tmp_path, bad, "none", steps=2, extra="  teacher: none\n"), str(tmp_path / "c3"),
                  str(tmp_path / "o3"))
    assert "distilling" not in r.stdout
    assert open(os.path.join(tmp_path, "o3", "vae", WEIGHTS["vae"]), "rb").read() == \
        open(os.path.join(bad, "vae", WEIGHTS["vae"]), "rb").read()
