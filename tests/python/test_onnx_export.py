"""export: ONNX graphs written by the C++ model code (export/onnx/*.onnx + .onnx.data), which
Debian's onnx checker accepts inside the stage and onnxruntime runs to diffusers' and
transformers' outputs within 1e-3, on the tiny models and on the full SD1.5 configuration."""
import json
import os

import pytest
import torch

from test_finetune_stage import write_stage_job
from test_quantize import run_one_stage

TOL = 1e-3


def session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run(sess, **inputs):
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    return {n: torch.from_numpy(o) for n, o in zip(names, outs)}


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def export_onnx(tmp_path, model_dir, name="onnx"):
    out = run_one_stage(tmp_path, model_dir, "export", "  sharded: false\n", name)
    return out, os.path.join(out, "onnx")


def check_unet(d, model_dir, batch, size, ctx_len, seed):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, *size, generator=g)
    ctx = torch.randn(batch, ctx_len, unet.config.cross_attention_dim, generator=g)
    sess = session(os.path.join(d, "unet.onnx"))
    errs = []
    # one timestep for the batch, and one per sample
    for t in (torch.tensor([421.0]), torch.linspace(1, 999, batch)):
        with torch.no_grad():
            ref = unet(sample, t if t.numel() > 1 else t[0], encoder_hidden_states=ctx).sample
        ours = run(sess, sample=sample, timestep=t, encoder_hidden_states=ctx)["out_sample"]
        errs.append(max_err(ours, ref))
    return errs, ref.abs().max().item()


def check_vae(d, model_dir, latent_size, seed):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).eval()
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 4, *latent_size, generator=g)
    img = torch.rand(2, 3, latent_size[0] * 8, latent_size[1] * 8, generator=g) * 2 - 1
    with torch.no_grad():
        dec = vae.decode(lat).sample
        params = vae.encode(img).latent_dist.parameters
    ours_dec = run(session(os.path.join(d, "vae_decoder.onnx")), latent_sample=lat)["sample"]
    ours_enc = run(session(os.path.join(d, "vae_encoder.onnx")), sample=img)["latent_parameters"]
    return max_err(ours_dec, dec), max_err(ours_enc, params)


def check_text_encoder(d, model_dir, seq, seed):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
    g = torch.Generator().manual_seed(seed)
    vocab = te.config.vocab_size
    ids = torch.randint(0, vocab - 1, (2, seq), generator=g)
    ids[0, seq // 2] = te.config.eos_token_id if te.config.eos_token_id != 2 else vocab - 1
    with torch.no_grad():
        ref = te(ids)
    ours = run(session(os.path.join(d, "text_encoder.onnx")), input_ids=ids)
    return (max_err(ours["last_hidden_state"], ref.last_hidden_state),
            max_err(ours["pooler_output"], ref.pooler_output))


def test_tiny_models_run_in_onnxruntime_as_in_diffusers(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    out, d = export_onnx(tmp_path, model_dir)
    report = json.load(open(os.path.join(out, "export.json")))["onnx"]
    assert (report["ir_version"], report["opset"]) == (8, 17)
    assert sorted(report["models"]) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for name, m in report["models"].items():
        assert os.path.getsize(os.path.join(d, m["file"])) == m["model_bytes"]
        assert m["data_file"] == m["file"] + ".data"
        assert os.path.getsize(os.path.join(d, m["data_file"])) == m["data_bytes"] > m["model_bytes"]

    # dynamic batch and spatial axes: two batch sizes, square and not, a size the
    # down/up path does not halve evenly (the upsampler meets its skip's size)
    for batch, size, ctx_len, seed in ((2, (16, 16), 77, 0), (1, (24, 16), 7, 1), (3, (18, 14), 77, 2)):
        errs, scale = check_unet(d, model_dir, batch, size, ctx_len, seed)
        assert max(errs) < TOL and scale > 0.1, (size, errs, scale)
    for size, seed in (((8, 8), 0), ((6, 10), 1)):
        dec, enc = check_vae(d, model_dir, size, seed)
        assert dec < TOL and enc < TOL, (size, dec, enc)
    for seq, seed in ((77, 0), (12, 1)):
        last, pooled = check_text_encoder(d, model_dir, seq, seed)
        assert last < TOL and pooled < TOL, (seq, last, pooled)


def test_onnx_file_is_what_the_checker_and_the_runtime_see(tiny_sd, tmp_path):
    import onnxruntime as ort

    model_dir, _ = tiny_sd
    _, d = export_onnx(tmp_path, model_dir)
    sess = session(os.path.join(d, "unet.onnx"))
    inputs = {i.name: i for i in sess.get_inputs()}
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert inputs["sample"].shape == ["batch", 4, "height", "width"]
    assert inputs["encoder_hidden_states"].shape[0:2] == ["batch", "sequence"]
    assert [o.name for o in sess.get_outputs()] == ["out_sample"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["component"] == "unet" and meta["source"] == os.path.abspath(model_dir)
    # A truncated data file must not load as a model that runs.
    bad = tmp_path / "bad"
    bad.mkdir()
    os.link(os.path.join(d, "unet.onnx"), bad / "unet.onnx")
    data = open(os.path.join(d, "unet.onnx.data"), "rb").read()
    (bad / "unet.onnx.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        ort.InferenceSession(str(bad / "unet.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["guidance_embedded", "linear_projection_centered"])
def test_unet_variants_run_in_onnxruntime_as_in_diffusers(tmp_path, variant):
    """A CFG-distilled UNet (time_cond_proj_dim: timestep_cond is an input) and one with
    linear proj_in/proj_out, a centered input and a mid-block scale, exported alone."""
    from sdtest.tiny_models import make_unet

    overrides = (dict(time_cond_proj_dim=16) if variant == "guidance_embedded" else
                 dict(use_linear_projection=True, center_input_sample=True, mid_block_scale_factor=1.5,
                      flip_sin_to_cos=False, freq_shift=1))
    unet = make_unet(3, **overrides)
    model = tmp_path / "m"
    unet.save_pretrained(str(model / "unet"))
    (model / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    out, d = export_onnx(tmp_path, str(model))
    assert sorted(json.load(open(os.path.join(out, "export.json")))["onnx"]["models"]) == ["unet"]
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([600.0, 20.0])
    feed = dict(sample=sample, timestep=t, encoder_hidden_states=ctx)
    kwargs = {}
    if variant == "guidance_embedded":
        from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
            LatentConsistencyModelPipeline)

        w = torch.tensor([6.5, 2.0])
        cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=16)
        feed["timestep_cond"] = kwargs["timestep_cond"] = cond
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=ctx, **kwargs).sample
    sess = session(os.path.join(d, "unet.onnx"))
    assert [i.name for i in sess.get_inputs()] == list(feed)
    assert max_err(run(sess, **feed)["out_sample"], ref) < TOL


def test_export_refuses_a_model_without_components(tiny_sd, tmp_path):
    from test_finetune_stage import run_stage

    model_dir, _ = tiny_sd
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model_index.json").write_text(open(os.path.join(model_dir, "model_index.json")).read())
    job = write_stage_job(tmp_path, "empty", str(empty), "export", "  sharded: false\n", seed=0)
    out = tmp_path / "empty_out"
    r = run_stage(job, str(tmp_path / "empty_ckpt"), str(out), check=False)
    assert r.returncode != 0 and "has none of them" in r.stderr, r.stderr
    assert not (out / "onnx").exists()


def test_full_sd15_runs_in_onnxruntime_as_in_diffusers(tiny_sd, tmp_path):
    from sdtest.tiny_models import write_sd15_random

    import shutil

    src = str(tmp_path / "sd15")
    out = str(tmp_path / "sd15_out")
    try:
        write_sd15_random(src, tiny_sd[0])
        out, d = export_onnx(tmp_path, src, "sd15")
        report = json.load(open(os.path.join(out, "export.json")))["onnx"]["models"]
        assert report["unet"]["data_bytes"] > 3.4e9 > 2 ** 31 > report["unet"]["model_bytes"]
        errs, scale = check_unet(d, src, 2, (16, 16), 77, 0)
        assert max(errs) < TOL, (errs, scale)
        dec, enc = check_vae(d, src, (8, 8), 0)
        assert dec < TOL and enc < TOL, (dec, enc)
        last, pooled = check_text_encoder(d, src, 77, 0)
        assert last < TOL and pooled < TOL, (last, pooled)
    finally:  # ~9 GB of model and export: pytest keeps its last three runs' folders
        for p in (src, out, str(tmp_path / "sd15_ckpt")):
            shutil.rmtree(p, ignore_errors=True)
