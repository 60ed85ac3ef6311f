"""clip_distillation: a text encoder with fewer layers that transformers loads, that the
C++ encoder runs as transformers does, that learns the teacher's outputs, resumes
exactly and is data-parallel."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import run_bin
from sdtest.tiny_models import write_layer_dropped
from test_finetune_stage import run_stage, run_two_ranks, te, unet, write_stage_job
from test_parity import assert_diffusers_samples_as_sdctl, maxdiff, probe

PROMPTS = ["a red square", "", "a blue square", "a purple star in the corner"]


def write_job(tmp_path, model_dir, name="clip", batch=2, lr="1.0e-3", steps=6, extra=""):
    return write_stage_job(tmp_path, name, model_dir, "clip_distillation",
                           f"  steps: {steps}\n  lr: {lr}\n  ema_decay: 0.9\n  empty_prompt_fraction: 0.25\n{extra}",
                           seed=4, batch=batch)


def encode(text_encoder_dir, ids):
    from transformers import CLIPTextModel

    m = CLIPTextModel.from_pretrained(text_encoder_dir)
    with torch.no_grad():
        return m(ids, output_hidden_states=True)


def test_student_is_a_transformers_encoder_the_cpp_one_runs_and_it_learned(tiny_sd, tmp_path):
    model_dir, pipe = tiny_sd
    out = str(tmp_path / "out")
    r = run_stage(write_job(tmp_path, model_dir, steps=40), str(tmp_path / "ckpt"), out)
    assert "step 40/40" in r.stdout
    cfg = json.load(open(os.path.join(out, "text_encoder", "config.json")))
    teacher_cfg = json.load(open(os.path.join(model_dir, "text_encoder", "config.json")))
    assert cfg["num_hidden_layers"] == 2 and teacher_cfg["num_hidden_layers"] == 3  # half, rounded up
    assert {k: v for k, v in cfg.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in teacher_cfg.items() if k != "num_hidden_layers"}
    # The UNet is the input's, untouched.
    a, b = unet(out), unet(model_dir)
    assert all(np.array_equal(a[k], b[k]) for k in b)
    # The token embedding is the teacher's (train_token_embedding: false by default).
    student, teacher = te(out), te(model_dir)
    emb = "embeddings.token_embedding.weight"
    np.testing.assert_array_equal(student[emb], teacher[emb])

    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ref = encode(os.path.join(out, "text_encoder"), ids)
    ours = probe("text-encoder", os.path.join(out, "text_encoder"), {"input_ids": ids}, tmp_path)
    assert maxdiff(ours["last_hidden_state"], ref.last_hidden_state) < 1e-4
    for i, h in enumerate(ref.hidden_states):
        assert maxdiff(ours[f"hidden_states.{i}"], h) < 1e-4, i

    # It learned: closer to the teacher than the layers it started from (0 and 2), on a
    # caption and on the empty prompt CFG reads.
    start = encode(write_layer_dropped(os.path.join(model_dir, "text_encoder"), [0, 2], str(tmp_path / "init")), ids)
    goal = encode(os.path.join(model_dir, "text_encoder"), ids).last_hidden_state
    for j in (0, 1):
        before = float((start.last_hidden_state[j] - goal[j]).pow(2).mean())
        after = float((ref.last_hidden_state[j] - goal[j]).pow(2).mean())
        assert after < 0.7 * before, (PROMPTS[j], before, after)

    # A complete diffusers folder: diffusers samples it as sdctl does.
    assert_diffusers_samples_as_sdctl(out, tmp_path, "a red square", steps=2, guidance=5.0, seed=1)


def test_resume_is_exact_and_two_workers_match_one(tiny_sd, tmp_path):
    model_dir = tiny_sd[0]
    extra = "  attention_weight: 0.5\n  teacher_layers: [1, 2]\n"
    job = write_job(tmp_path, model_dir, steps=5, extra=extra)
    full = str(tmp_path / "full")
    run_stage(job, str(tmp_path / "ckpt_full"), full)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    r = run_stage(job, ckpt, out, stop_at=3, check=False)
    assert r.returncode != 0 and "stopped at step 3" in r.stderr
    r = run_stage(job, ckpt, out)
    assert "step 3/5" in r.stdout and "step 2/5" not in r.stdout
    a, b = te(full), te(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    single = str(tmp_path / "single")
    run_stage(write_job(tmp_path, model_dir, "b2", batch=2, lr="1.0e-5", steps=6, extra=extra),
              str(tmp_path / "c1"), single)
    dp = str(tmp_path / "dp")
    run_two_ranks(write_job(tmp_path, model_dir, "b1", batch=1, lr="1.0e-5", steps=6, extra=extra),
                  str(tmp_path / "c2"), dp)
    a, b, start = te(single), te(dp), te(model_dir)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5
    moved = "encoder.layers.0.mlp.fc1.weight"  # student layer 0 started as teacher layer 1
    assert float(np.abs(a[moved] - start["encoder.layers.1.mlp.fc1.weight"]).max()) > 5e-6


@pytest.mark.parametrize("section, message", [
    ("  teacher_layers: [2, 1]\n", "must increase: 1 follows 2"),
    ("  layers: 2\n  teacher_layers: [2]\n", "names 1 teacher layers for 2 student layers"),
    ("  hidden_weight: 0\n  intermediate_weight: 0\n", "the student would learn nothing"),
    ("  layers: -1\n", "clip_distillation.layers\" is -1, out of range"),
])
def test_bad_options_are_refused_at_submit(tiny_sd, tmp_path, section, message):
    job = write_job(tmp_path, tiny_sd[0], extra=section)
    r = run_bin("sdctl", "submit", job, check=False)  # refused before any coordinator is asked
    assert r.returncode != 0 and message in r.stderr and "clip_distillation" in r.stderr, r.stderr


@pytest.mark.parametrize("section, message", [
    ("  layers: 3\n", "3 student layers for a teacher of 3"),
    ("  teacher_layers: [0, 3]\n", "names teacher layer 3, but the text encoder of"),
])
def test_a_student_the_teacher_cannot_give_is_named(tiny_sd, tmp_path, section, message):
    r = run_stage(write_job(tmp_path, tiny_sd[0], extra=section), str(tmp_path / "ckpt"), str(tmp_path / "out"),
                  check=False)
    assert r.returncode != 0 and message in r.stderr and "text_encoder" in r.stderr, r.stderr
    assert not os.path.exists(str(tmp_path / "out"))
