"""quantize with int8: the UNet calibrated on the dataset's captions at its own sampling
steps, written as unet_int8.safetensors (+ unet_int8.pt), read back by sdctl and by an
independent Python reading of the documented format."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.jit._pickle as jit_pickle
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_bin
from test_finetune_stage import make_dataset, run_stage
from test_quantize import latents

SECTION = ("  dtype: fp16\n  int8: true\n  calibration_samples: 8\n  heldout_prompts: 2\n"
           "  calibration_steps: 3\n  calibration_batch: 4\n")


def write_job(tmp_path, name, model_dir, section, n_images=12):
    data = make_dataset(str(tmp_path / f"data{n_images}"), n=n_images)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: {model_dir}\ndataset: {data}\nseed: 0\nstages: [quantize]\nquantize:\n{section}")
    return str(path)


@pytest.fixture(scope="module")
def int8_model(tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    job = write_job(tmp, "int8", tiny_sd[0], SECTION)
    out = str(tmp / "out")
    run_stage(job, str(tmp / "ckpt"), out)
    return out


def header_of(path):
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["sdcompress"])


def fake_quant_unet(unet, path):
    """The file's INT8 UNet as float arithmetic: dequantized weights, conv inputs through
    the stored affine map, Linear inputs quantized per token - what the header says."""
    header, t = header_of(path), load_file(path)
    for name, layer in header["layers"].items():
        m = unet.get_submodule(name)
        q, s = t[f"{name}.weight"], t[f"{name}.weight_scale"]
        m.weight.data = q.float() * s.view(-1, *([1] * (q.dim() - 1)))
        if layer["kind"] == "conv2d":
            scale, zp = float(t[f"{name}.input_scale"]), float(t[f"{name}.input_zero_point"])
            m.register_forward_pre_hook(
                lambda mod, args, scale=scale, zp=zp: ((torch.clamp(torch.round(args[0] / scale) + zp, 0, 255) - zp)
                                                       * scale,))
        else:
            def per_token(mod, args):
                x = args[0]
                s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
                return (torch.round(x / s).clamp(-127, 127) * s,)
            m.register_forward_pre_hook(per_token)


def png(path):
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.int16)


def test_int8_file_follows_its_documented_format(tiny_sd, int8_model):
    model_dir, _ = tiny_sd
    path = os.path.join(int8_model, "unet_int8.safetensors")
    header = header_of(path)
    assert header["format"] == "sdcompress.unet_int8/1"
    assert json.load(open(os.path.join(model_dir, "unet", "config.json")))["block_out_channels"] == \
        header["config"]["block_out_channels"]
    # The first and last convolutions and the time embedding stay float, each with its reason.
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert name in header["float_layers"] and header["float_layers"][name], name
        assert name not in header["layers"]
    kinds = {v["kind"] for v in header["layers"].values()}
    assert kinds == {"conv2d", "linear"}
    cal = header["calibration"]
    assert cal["prompts"] == 8 and cal["steps"] == 3 and cal["heldout_prompts"] == 2
    assert set(cal["clipping_candidates_psnr_db"]) == {"absmax", "percentile", "mse"}
    assert cal["clipping"] == max(cal["clipping_candidates_psnr_db"], key=cal["clipping_candidates_psnr_db"].get)
    assert set(cal["layer_sqnr_db"]) >= set(header["layers"])

    src = load_file(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    t = load_file(path)
    int8_names = set()
    for name, layer in header["layers"].items():
        q, s = t[f"{name}.weight"], t[f"{name}.weight_scale"]
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (q.shape[0],)
        w = src[f"{name}.weight"]
        err = (q.float() * s.view(-1, *([1] * (q.dim() - 1))) - w).abs()
        assert (err <= s.view(-1, *([1] * (q.dim() - 1))) / 2 + 1e-6).all(), name
        assert q.abs().amax() == 127
        if layer["kind"] == "conv2d":
            assert t[f"{name}.input_scale"].item() > 0 and 0 <= t[f"{name}.input_zero_point"].item() <= 255
        int8_names |= {f"{name}.{k}" for k in ("weight", "weight_scale", "input_scale", "input_zero_point")}
    # Every other tensor is the float model's, under its diffusers name.
    for k, v in t.items():
        if k not in int8_names and not k.endswith(".bias"):
            assert torch.equal(v, src[k]), k
    assert set(src) - set(t) == set()

    # unet_int8.pt: the same tensors and header, as torch.load reads them.
    # torch::pickle_save tags its typed dict with torch.jit._pickle.restore_type_tag, which
    # weights-only loading accepts once allowed (docs/architecture.md "INT8 UNet file").
    with torch.serialization.safe_globals([jit_pickle.restore_type_tag]):
        pt = torch.load(os.path.join(int8_model, "unet_int8.pt"), weights_only=True)
    header_bytes = pt.pop("__header__")
    assert json.loads(bytes(header_bytes.tolist()).decode()) == header
    assert set(pt) == set(t) and all(torch.equal(pt[k], t[k]) for k in t)
    report = json.load(open(os.path.join(int8_model, "quantization.json")))["int8_unet"]
    assert report["int8_convolutions"] + report["int8_linears"] == len(header["layers"])


def test_int8_unet_computes_what_the_format_says_and_sdctl_samples_with_it(tiny_sd, int8_model, tmp_path):
    from diffusers import UNet2DConditionModel

    model_dir, pipe = tiny_sd
    int8_file = os.path.join(int8_model, "unet_int8.safetensors")
    # One UNet forward on the pipeline's own kind of input: latents, a mid timestep, the
    # text embeddings of a prompt and of the empty prompt.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ids = pipe.tokenizer(["a blue square", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        ctx = pipe.text_encoder(ids)[0]
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": ctx.contiguous()}
    io = str(tmp_path / "io.safetensors")
    save_file(inputs, io)
    ours = {}
    for tag, extra in (("int8", ["--int8", int8_file, "--layer-io"]),
                       ("float", ["--model", os.path.join(model_dir, "unet")])):
        out = str(tmp_path / f"{tag}.safetensors")
        run_bin("sd_probe", "unet", *extra, "--inputs", io, "--out", out)
        ours[tag] = load_file(out)

    # An independent reading of the file: each INT8 layer, given the input it had in the
    # C++ forward, computes through the dequantized weights and the stored activation map
    # (or per-token quantization) what the C++ kernel returned.
    header = header_of(int8_file)
    ref = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    fake_quant_unet(ref, int8_file)
    for name in header["layers"]:
        x, y = ours["int8"][f"in.{name}"], ours["int8"][f"out.{name}"]
        with torch.no_grad():
            expected = ref.get_submodule(name)(x)
        # Both round x / scale; the C++ side multiplies by 1 / scale, so a value within an
        # ulp of a rounding boundary may land one step over (measured 1.4e-4 at worst),
        # while INT8's own error per layer is about 1e-2.
        assert (y - expected).norm() <= 1e-3 * expected.norm(), name

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # The whole INT8 UNet stays near the float one it came from.
    assert 1e-4 < rel(ours["int8"]["sample"], ours["float"]["sample"]) < 0.1

    # sdctl loads it the same way as any other model, and its image stays close to float.
    prompt, steps, guidance = "a blue square", 4, 5.0
    _, lat_path = latents(tmp_path, 5)
    images = {}
    for unet_kind in ("float", "int8"):
        images[unet_kind] = str(tmp_path / f"{unet_kind}.png")
        run_bin("sdctl", "generate", "--model", int8_model, "--unet", unet_kind, "--prompt", prompt, "--steps",
                steps, "--guidance", guidance, "--latents", lat_path, "--out", images[unet_kind])
    full = str(tmp_path / "fp32.png")
    run_bin("sdctl", "generate", "--model", model_dir, "--prompt", prompt, "--steps", steps, "--guidance", guidance,
            "--latents", lat_path, "--out", full)
    mse = np.mean((png(images["int8"]).astype(np.float64) - png(full)) ** 2)
    assert 10 * np.log10(255.0 ** 2 / max(mse, 1e-9)) > 30


def test_int8_errors_name_what_is_wrong(tiny_sd, tmp_path, int8_model):
    model_dir, _ = tiny_sd
    # Too few calibration samples: refused at submit, at the key.
    job = write_job(tmp_path, "few", model_dir, "  calibration_samples: 4\n")
    r = run_bin("sdctl", "submit", job, check=False)
    assert r.returncode != 0 and "quantize.calibration_samples" in r.stderr, r.stderr
    # A dataset smaller than the calibration set.
    job = write_job(tmp_path, "small", model_dir, "  dtype: bf16\n", n_images=6)
    r = run_stage(job, str(tmp_path / "ckpt1"), str(tmp_path / "out1"), check=False)
    assert r.returncode != 0 and "= 108 prompts, but dataset" in r.stderr and "has only 6" in r.stderr, r.stderr
    # A model without a UNet.
    no_unet = tmp_path / "no_unet"
    shutil.copytree(model_dir, no_unet)
    shutil.rmtree(no_unet / "unet")
    job = write_job(tmp_path, "nounet", str(no_unet), SECTION)
    r = run_stage(job, str(tmp_path / "ckpt2"), str(tmp_path / "out2"), check=False)
    assert r.returncode != 0 and "has no unet/" in r.stderr, r.stderr

    # INT8 files whose header and tensors disagree.
    src = os.path.join(int8_model, "unet_int8.safetensors")
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    t = load_file(src)
    header = json.loads(meta["sdcompress"])
    name = next(n for n, l in header["layers"].items() if l["kind"] == "conv2d")

    def attempt(tag, tensors, metadata):
        bad = tmp_path / tag
        shutil.copytree(int8_model, bad)
        save_file(tensors, str(bad / "unet_int8.safetensors"), metadata=metadata)
        return run_bin("sdctl", "generate", "--model", bad, "--unet", "int8", "--prompt", "x", "--steps", 1,
                       "--out", tmp_path / f"{tag}.png", check=False)

    shrunk = dict(t, **{f"{name}.weight": t[f"{name}.weight"][1:].contiguous()})
    r = attempt("shape", shrunk, meta)
    assert r.returncode != 0 and f"'{name}.weight' has shape" in r.stderr and "expects" in r.stderr, r.stderr
    as_float = dict(t, **{f"{name}.weight": t[f"{name}.weight"].float()})
    r = attempt("dtype", as_float, meta)
    assert r.returncode != 0 and f"'{name}.weight' is F32, expected I8" in r.stderr, r.stderr
    renamed = json.loads(meta["sdcompress"])
    renamed["layers"]["down_blocks.9.resnets.0.conv1"] = renamed["layers"].pop(name)
    r = attempt("layer", t, dict(meta, sdcompress=json.dumps(renamed)))
    assert r.returncode != 0 and "header names INT8 layer 'down_blocks.9.resnets.0.conv1'" in r.stderr, r.stderr
    no_scale = {k: v for k, v in t.items() if k != f"{name}.input_scale"}
    r = attempt("scale", no_scale, meta)
    assert r.returncode != 0 and f"'{name}.input_scale' is missing" in r.stderr, r.stderr


def test_int8_convolutions_false_quantizes_only_the_linear_layers(tiny_sd, tmp_path):
    """The Linear-only scope of quantize_dynamic and torchao: every convolution stays float,
    each listed with why, and no clipping is searched (there are no static ranges)."""
    job = write_job(tmp_path, "linear", tiny_sd[0], SECTION + "  int8_convolutions: false\n")
    out = str(tmp_path / "out")
    run_stage(job, str(tmp_path / "ckpt"), out)
    header = header_of(os.path.join(out, "unet_int8.safetensors"))
    kinds = {l["kind"] for l in header["layers"].values()}
    assert kinds == {"linear"}, kinds
    report = json.load(open(os.path.join(out, "quantization.json")))["int8_unet"]
    assert report["int8_convolutions"] == 0 and report["int8_linears"] == len(header["layers"]) > 0
    convs = [n for n, why in report["float_layers"].items() if why.startswith("int8_convolutions: false")]
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(os.path.join(tiny_sd[0], "unet"))
    all_convs = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # Every convolution is float: by this option, or by the rules (first, last, ...).
    assert set(convs) <= all_convs and all_convs <= set(report["float_layers"]), all_convs - set(report["float_layers"])
    assert convs, report["float_layers"]
    assert report["calibration"]["clipping"] == "none", report["calibration"]
