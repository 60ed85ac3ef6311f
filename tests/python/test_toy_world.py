"""The toy world through the product: dataset synthesis, the teacher-building
stages (init, train_vae, finetune) as one job, the probe classifier and
`sdctl eval`."""
import filecmp
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import ROOT, run_bin


def synth(out, count, *extra):
    return run_bin("sdctl", "dataset", "synth", "--out", out, "--count", count, *extra)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    synth(str(d / "train"), 600, "--seed", 0)
    synth(str(d / "heldout"), 60, "--seed", 1, "--split", "heldout")
    return d


def test_synth_writes_an_image_folder_that_others_can_read(tmp_path, toy_data):
    lines = [json.loads(l) for l in open(toy_data / "train" / "metadata.jsonl")]
    assert len(lines) == 600
    for line in lines[:50]:
        img = Image.open(toy_data / "train" / line["file_name"])
        assert img.size == (64, 64) and img.mode == "RGB"
        for obj in line["objects"]:
            for key in ("shape", "color", "size"):
                assert obj[key] in line["text"]
    assert {len(l["objects"]) for l in lines} == {1, 2}
    # Several phrasings.
    assert len({l["text"].split(" ")[0] for l in lines}) >= 3
    # Deterministic: the same command writes the same bytes.
    synth(str(tmp_path / "again"), 600, "--seed", 0)
    assert filecmp.cmp(toy_data / "train" / "metadata.jsonl", tmp_path / "again" / "metadata.jsonl", shallow=False)
    assert filecmp.cmp(toy_data / "train" / "000123.png", tmp_path / "again" / "000123.png", shallow=False)
    # Held-out scenes are single-shape attribute combinations train never shows.
    train_single = {json.dumps([l["objects"], l["background"]], sort_keys=True)
                    for l in lines if len(l["objects"]) == 1}
    held = [json.loads(l) for l in open(toy_data / "heldout" / "metadata.jsonl")]
    assert all(len(l["objects"]) == 1 for l in held)
    assert not train_single & {json.dumps([l["objects"], l["background"]], sort_keys=True) for l in held}


def test_webdataset_shards_are_standard_tar_with_jpegs(tmp_path):
    out = tmp_path / "wds"
    synth(str(out), 10, "--shard-size", 4, "--image-format", "jpg")
    shards = sorted(os.listdir(out))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(out / shards[0]) as t:
        names = t.getnames()
        assert names[:3] == ["000000.jpg", "000000.txt", "000000.json"]
        img = Image.open(t.extractfile("000000.jpg"))
        assert img.format == "JPEG" and img.size == (64, 64)
        caption = t.extractfile("000000.txt").read().decode()
        assert json.loads(t.extractfile("000000.json").read())["text"] == caption


def test_synth_rejects_bad_flags(tmp_path):
    r = run_bin("sdctl", "dataset", "synth", "--out", tmp_path / "x", "--split", "test", check=False)
    assert r.returncode != 0 and "--split must be train or heldout" in r.stderr


def test_teacher_job_builds_a_model_diffusers_loads(tmp_path, toy_data, clip_tokenizer_dir):
    """init -> train_vae -> finetune as one `sdctl run` job, on the toy configs."""
    job = tmp_path / "teacher.yaml"
    job.write_text(f"""name: toy-teacher-test
model: {ROOT}/examples/toy-sd
dataset: {toy_data / 'train'}
output: {tmp_path / 'out'}
batch_size: 4
checkpoint_interval: 2
data:
  caption_dropout: 0.5
train_vae:
  steps: 4
  lr: 1.0e-3
  foreground_weight: 5
finetune:
  steps: 3
  lr: 1.0e-3
stages: [finetune, init, train_vae]
""")
    r = run_bin("sdctl", "run", job)
    assert "SUCCEEDED" in r.stdout, r.stdout + r.stderr
    runs = tmp_path / "out" / "runs"
    (job_dir,) = [p for p in runs.iterdir() if p.name.startswith("job-")]
    init, vae, final = job_dir / "init", job_dir / "train_vae", job_dir / "finetune"
    # init wrote CLIP's tokenizer exactly as transformers' files are made.
    assert filecmp.cmp(init / "tokenizer" / "merges.txt",
                       os.path.join(clip_tokenizer_dir, "merges.txt"), shallow=False)
    ours = json.load(open(init / "tokenizer" / "vocab.json", encoding="utf-8"))
    assert ours == json.load(open(os.path.join(clip_tokenizer_dir, "vocab.json"), encoding="utf-8"))
    # Each stage starts from the previous one's model and changes only its component.
    w_init, w_vae = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (init, vae))
    assert any(not np.array_equal(w_init[k], w_vae[k]) for k in w_init)
    assert filecmp.cmp(vae / "unet" / "diffusion_pytorch_model.safetensors",
                       init / "unet" / "diffusion_pytorch_model.safetensors", shallow=False)
    assert filecmp.cmp(final / "vae" / "diffusion_pytorch_model.safetensors",
                       vae / "vae" / "diffusion_pytorch_model.safetensors", shallow=False)
    # train_vae sets scaling_factor from the latents' spread, like SD's 0.18215.
    sf = json.load(open(vae / "vae" / "config.json"))["scaling_factor"]
    assert sf > 0 and sf != 1.0
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(final), safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(sf)
    assert pipe.tokenizer("a red star").input_ids[:2] == [49406, pipe.tokenizer.convert_tokens_to_ids("a</w>")]


def test_probe_and_eval(tmp_path, toy_data, tiny_sd):
    probe = tmp_path / "probe.safetensors"
    r = run_bin("sdctl", "probe", "train", "--data", toy_data / "train", "--heldout",
                toy_data / "heldout", "--out", probe, "--steps", 300)
    report = json.loads(r.stdout)
    acc = report["heldout"]["accuracy"]
    assert report["heldout"]["images"] == 60
    # 300 steps on 600 images: colors and positions already far above chance
    # (1/6, 1/9); shapes need the full training (docs/toy-world.md).
    assert acc["color"] > 0.5 and acc["position"] > 0.5, acc
    assert json.load(open(str(probe) + ".json"))["heldout"]["accuracy"] == acc

    model, _ = tiny_sd
    out = tmp_path / "eval"
    r = run_bin("sdctl", "eval", "--model", model, "--reference", model, "--prompts",
                toy_data / "heldout", "--probe", probe, "--out", out, "--count", 6,
                "--steps", 3, "--reference-steps", 3, "--seeds-per-prompt", 2, "--batch", 4)
    e = json.load(open(out / "eval.json"))
    # A model against itself at the same seeds: identical images and latents.
    assert e["fidelity"]["ssim"] == pytest.approx(1.0)
    assert e["fidelity"]["psnr_db"] == pytest.approx(100.0)
    assert e["fidelity"]["latent_mse"] == 0.0
    assert e["candidate"]["accuracy"] == e["reference"]["accuracy"]
    assert e["count"] == 6 and e["candidate"]["diversity"] > 0
    assert e["candidate"]["size_bytes"] > 0 and e["candidate"]["parameters"] > 0
    assert Image.open(out / "grid.png").size[0] > 0

    # Fewer steps: a different picture, measured as such.
    r = run_bin("sdctl", "eval", "--model", model, "--reference", model, "--prompts",
                toy_data / "heldout", "--probe", probe, "--out", out, "--count", 6,
                "--steps", 1, "--reference-steps", 3, "--seeds-per-prompt", 1)
    e = json.load(open(out / "eval.json"))
    assert e["fidelity"]["psnr_db"] < 60 and e["fidelity"]["latent_mse"] > 0
    assert "diversity" not in e["candidate"]


def test_eval_errors_name_the_problem(tmp_path, toy_data, tiny_sd):
    model, _ = tiny_sd
    r = run_bin("sdctl", "eval", "--model", model, "--prompts", toy_data / "heldout", "--probe",
                tmp_path / "missing.safetensors", "--out", tmp_path / "e", check=False)
    assert r.returncode != 0 and "missing.safetensors" in r.stderr
