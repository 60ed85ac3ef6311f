"""Tiny random Stable-Diffusion-architecture models, made by diffusers/transformers.

Used by the parity tests and as the quick-start's test model. The tokenizer is
built from the real CLIP BPE vocabulary shipped in the open-clip-torch wheel,
exactly as openai/clip-vit-large-patch14's vocab.json/merges.txt were.

    python -m sdtest.tiny_models OUT_DIR      # writes a diffusers pipeline folder
"""
import gzip
import importlib.util
import json
import os
import sys

import torch


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_path():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise RuntimeError("open-clip-torch is not installed (scripts/setup.sh installs it)")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


def write_clip_tokenizer(out_dir, pad_token="<|endoftext|>"):
    os.makedirs(out_dir, exist_ok=True)
    lines = gzip.open(clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return out_dir


def _perturb(model, seed):
    # Default inits leave norms at exactly 1/0; perturb every tensor so that a
    # mis-wired parameter cannot hide behind an identity.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=16,
)

TINY_VAE = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)

TINY_CLIP = dict(
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=3,
    vocab_size=49408,
    max_position_embeddings=77,
)

SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)


def make_unet(seed=0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _perturb(UNet2DConditionModel(**{**TINY_UNET, **overrides}), seed).eval()


def make_vae(seed=1, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _perturb(AutoencoderKL(**{**TINY_VAE, **overrides}), seed).eval()


def make_text_encoder(seed=2, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return _perturb(CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, **overrides})), seed).eval()


def make_pipeline(out_dir, seed=0, prediction_type="epsilon"):
    """Writes a complete tiny diffusers StableDiffusionPipeline folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    import tempfile

    tok_dir = write_clip_tokenizer(tempfile.mkdtemp(prefix="clip_tok_"))
    pipe = StableDiffusionPipeline(
        unet=make_unet(seed),
        vae=make_vae(seed + 1),
        text_encoder=make_text_encoder(seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    # SD1.5's scheduler_config.json also carries DDIM's clip_sample=false, which
    # DDIMScheduler.from_config picks up; keep the file faithful to that.
    path = os.path.join(out_dir, "scheduler", "scheduler_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["clip_sample"] = False
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return pipe


# The full SD1.5 configurations (random weights in tests and benchmarks: no SD weights here).
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

SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")


def write_sd15_random(out_dir, tiny_dir):
    """A full SD1.5-configured pipeline folder, random weights, the tiny pipeline's tokenizer
    and scheduler."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    for name in ("tokenizer", "scheduler", "model_index.json"):
        src = os.path.join(tiny_dir, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(out_dir, name))
    UNet2DConditionModel(**SD15_UNET).save_pretrained(os.path.join(out_dir, "unet"))
    AutoencoderKL(**SD15_VAE).save_pretrained(os.path.join(out_dir, "vae"))
    CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).save_pretrained(os.path.join(out_dir, "text_encoder"))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "output/tiny-sd"
    if os.path.exists(os.path.join(out, "model_index.json")):
        print(out)
        sys.exit(0)
    tmp = out.rstrip("/") + ".tmp"
    make_pipeline(tmp)
    os.replace(tmp, out)
    print(out)


def write_layer_dropped(teacher_dir, keep, out_dir):
    """The text encoder of `teacher_dir` with only layers `keep` (renumbered 0..), untrained:
    what clip_distillation's student starts from, saved as a transformers folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    teacher = CLIPTextModel.from_pretrained(teacher_dir)
    cfg = CLIPTextConfig.from_pretrained(teacher_dir)
    cfg.num_hidden_layers = len(keep)
    student = CLIPTextModel(cfg)
    weights = {}
    for k, v in teacher.state_dict().items():
        if ".layers." in k:
            i = int(k.split(".layers.")[1].split(".")[0])
            if i not in keep:
                continue
            k = k.replace(f".layers.{i}.", f".layers.{keep.index(i)}.")
        weights[k] = v
    student.load_state_dict(weights)
    student.save_pretrained(out_dir)
    return out_dir
