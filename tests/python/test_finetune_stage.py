"""The finetune stage: trains, checkpoints, and resumes exactly after an interruption."""
import glob
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import run_bin


def make_dataset(path, n=6):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    lines = []
    rng = np.random.default_rng(0)
    for i in range(n):
        name, rgb = list(colors.items())[i % 3]
        img = np.full((40, 48, 3), 245, np.uint8)
        y, x = rng.integers(0, 20, size=2)
        img[y:y + 16, x:x + 16] = rgb
        Image.fromarray(img).save(os.path.join(path, f"{i}.png"))
        lines.append(f'{{"file_name": "{i}.png", "text": "a {name} square"}}')
    lines.insert(2, "{not json")  # a malformed line is skipped, the rest is used
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def job(tiny_sd, tmp_path):
    model_dir, _ = tiny_sd
    data = make_dataset(str(tmp_path / "data"))
    path = tmp_path / "job.yaml"
    path.write_text(f"""model: {model_dir}
dataset: {data}
seed: 7
batch_size: 2
checkpoint_interval: 2
stages: [finetune]
finetune:
  steps: 6
  lr: 1.0e-3
  ema: true
  lr_warmup_steps: 2
""")
    return str(path)


def run_stage(job, ckpt, out, stop_at=None, check=True):
    args = ["stage", "--job", job, "--checkpoint-dir", ckpt, "--out", out]
    if stop_at is not None:
        args += ["--stop-at", stop_at]
    return run_bin("sd_probe", *args, check=check)


def unet(out):
    return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_trains_and_writes_a_loadable_model(job, tmp_path, tiny_sd):
    out = str(tmp_path / "out")
    r = run_stage(job, str(tmp_path / "ckpt"), out)
    assert "step 6/6" in r.stdout
    trained = unet(out)
    teacher = load_file(os.path.join(tiny_sd[0], "unet", "diffusion_pytorch_model.safetensors"))
    moved = sum(float(np.abs(trained[k] - teacher[k]).max()) > 1e-6 for k in teacher)
    assert moved > len(teacher) // 2
    # The result is a complete model folder that sdctl can sample from.
    run_bin("sdctl", "generate", "--model", out, "--prompt", "a red square", "--steps", 2,
            "--out", str(tmp_path / "x.png"))


def test_resume_after_interruption_is_exact(job, tmp_path):
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "resumed")
    r = run_stage(job, ckpt, out, stop_at=3, check=False)
    assert r.returncode != 0 and "stopped at step 3" in r.stderr
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt, "step-*"))) == ["step-00000002"]
    r = run_stage(job, ckpt, out)
    assert "step 3/6" in r.stdout and "step 1/6" not in r.stdout  # resumed, not restarted
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_checkpoint_falls_back_to_the_previous(job, tmp_path):
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "out")
    run_stage(job, ckpt, out, stop_at=5, check=False)  # leaves step-2 and step-4
    latest = os.path.join(ckpt, "step-00000004", "unet.safetensors")
    with open(latest, "r+b") as f:
        f.seek(os.path.getsize(latest) // 2)
        f.write(b"\x00" * 64)
    r = run_stage(job, ckpt, out)
    assert "step 3/6" in r.stdout  # resumed from step 2
    a, b = unet(full), unet(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
