"""export: the UNet as shards in the seed's layout (export/sharded/unet_shard_*.safetensors +
shard_index.json) and in diffusers' own sharded form over the same files, which from_pretrained
and the C++ loader both load to the same weights."""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_bin
from test_finetune_stage import run_stage, write_stage_job
from test_quantize import run_one_stage


def export(tmp_path, model_dir, section, name="export"):
    return run_one_stage(tmp_path, model_dir, "export", section, name)


def test_sharded_unet_loads_in_diffusers_and_cpp_as_the_source(tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    model_dir, pipe = tiny_sd
    out = export(tmp_path, model_dir, "  max_shard_mb: 1\n")
    d = os.path.join(out, "sharded")
    seed_index = json.load(open(os.path.join(d, "shard_index.json")))
    diff_index = json.load(open(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json")))
    src = load_file(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    total = sum(t.numel() * t.element_size() for t in src.values())
    assert total > 2 * (1 << 20)  # the tiny UNet does make several 1 MiB shards
    shards = seed_index["shards"]
    assert len(shards) >= 3 and seed_index["total_size"] == total == diff_index["metadata"]["total_size"]
    assert sorted(seed_index["weight_map"]) == sorted(diff_index["weight_map"]) == sorted(src)
    for i, s in enumerate(shards):
        assert s["file"] == f"unet_shard_{i:05d}.safetensors"
        assert s["diffusers_file"] == f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        a, b = os.stat(os.path.join(d, s["file"])), os.stat(os.path.join(d, s["diffusers_file"]))
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)  # one copy of the bytes, two names
        with safe_open(os.path.join(d, s["file"]), "pt") as f:
            names = list(f.keys())
            nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
        assert len(names) == s["tensors"]
        assert nbytes <= 1 << 20 or len(names) == 1  # only a lone tensor may exceed the limit
        assert all(seed_index["weight_map"][k] == s["file"] for k in names)

    unet = UNet2DConditionModel.from_pretrained(d)
    theirs = unet.state_dict()
    for k, v in src.items():
        assert torch.equal(theirs[k], v), k

    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor(400),
              "encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}
    inp = str(tmp_path / "in.safetensors")
    save_file(inputs, inp)
    outs = []
    for m in (d, os.path.join(model_dir, "unet")):
        o = str(tmp_path / f"out{len(outs)}.safetensors")
        run_bin("sd_probe", "unet", "--model", m, "--inputs", inp, "--out", o)
        outs.append(load_file(o)["sample"])
    assert torch.equal(outs[0], outs[1])
    report = json.load(open(os.path.join(out, "export.json")))
    assert report["sharded"]["shards"] == len(shards)


def test_export_errors_name_the_problem(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    job = write_stage_job(tmp_path, "bad", model_dir, "export", "  max_shard_mb: 0\n", seed=0)
    r = run_bin("sdctl", "submit", job, check=False)
    assert r.returncode != 0 and 'key "export.max_shard_mb" is 0, out of range' in r.stderr, r.stderr
    job = write_stage_job(tmp_path, "off", model_dir, "export", "  sharded: false\n  onnx: false\n", seed=0)
    r = run_bin("sdctl", "submit", job, check=False)
    assert r.returncode != 0 and "nothing to export" in r.stderr, r.stderr
    # a folder without a UNet: refused by name, nothing published
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text(open(os.path.join(model_dir, "model_index.json")).read())
    job = write_stage_job(tmp_path, "nounet", str(no_unet), "export", "", seed=0)
    out = tmp_path / "nounet_out"
    r = run_stage(job, str(tmp_path / "nounet_ckpt"), str(out), check=False)
    assert r.returncode != 0 and "has no unet/config.json" in r.stderr, r.stderr
    assert not (out / "sharded").exists()
