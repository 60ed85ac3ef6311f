"""The C++ CLIP tokenizer gives transformers' CLIPTokenizer ids on varied prompts."""
import json
import os
import random

from conftest import run_bin

WORDS = ("a an the small large tiny huge red green blue yellow purple orange cyan magenta circle square "
         "triangle star hexagon at on in of top bottom left right center background photo painting of cat "
         "dog astronaut riding horse mars sunset city skyline watercolor highly detailed 8k trending "
         "artstation portrait woman man old young futuristic cyberpunk neon").split()
UNICODE = ["café", "naïve", "crème brûlée", "東京タワー", "北京", "서울", "🐱", "🚀✨", "Σίσυφος", "ΟΔΥΣΣΕΥΣ",
           "Москва", "Ελλάδα", "مرحبا", "नमस्ते", "e\u0301", "Å", "A\u030a", "ﬁ", "Ｆｕｌｌｗｉｄｔｈ", "İstanbul", "straße",
           "ǅ", "Ωmega", "½", "٣", "①", "™", "naïveté", "ça va", "Ñandú", "ﬀ", "\u00a0nbsp", "zero\u200bwidth"]
PUNCT = ["!", "!!!", "...", ",", ";", ":", "?", "(", ")", "[", "]", "{", "}", "\"", "'", "''", "-", "--", "_",
         "/", "\\", "@", "#", "$", "%", "^", "&", "*", "+", "=", "<", ">", "|", "~", "`", "<|endoftext|>",
         "<|startoftext|>"]
CONTRACTIONS = ["it's", "don't", "we'll", "they're", "I've", "I'm", "he'd", "IT'S", "rock'n'roll", "'s", "o'clock"]
NUMBERS = ["1", "42", "2024", "3.14159", "1,000,000", "4k", "8K", "v1.5", "0", "007", "1st", "2nd"]
SPACES = [" ", "  ", "\t", "\n", " \t\n ", "\r\n", "   "]


def make_prompts(n=1200, seed=0):
    rng = random.Random(seed)
    prompts = ["", " ", "a", "A", "hello world", "  leading and trailing  ", "UPPER lower MiXeD"]
    pools = [WORDS] * 6 + [UNICODE, PUNCT, CONTRACTIONS, NUMBERS]
    while len(prompts) < n:
        k = rng.choice([1, 3, 8, 15, 30, 90])  # 90-word prompts exceed 77 tokens
        parts = []
        for _ in range(k):
            parts.append(rng.choice(rng.choice(pools)))
            parts.append(rng.choice(SPACES) if rng.random() < 0.15 else ("" if rng.random() < 0.1 else " "))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = text.upper()
        if rng.random() < 0.1:
            text = text.title()
        prompts.append(text)
    return prompts


def test_tokenizer_matches_transformers(clip_tokenizer_dir, tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    assert len(tok) == 49408
    prompts = make_prompts()
    assert len(prompts) >= 1000
    ref = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    inp = os.path.join(tmp_path, "prompts.json")
    out = os.path.join(tmp_path, "ids.json")
    with open(inp, "w", encoding="utf-8") as f:
        json.dump(prompts, f, ensure_ascii=False)
    run_bin("sd_probe", "tokenize", "--model", clip_tokenizer_dir, "--inputs", inp, "--out", out)
    with open(out) as f:
        ours = json.load(f)
    mismatches = [(p, r, o) for p, r, o in zip(prompts, ref, ours) if r != o]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    full = tok(prompts).input_ids
    assert sum(1 for ids in full if len(ids) > 77) > 10  # some prompts were truncated
    assert sum(1 for p in prompts if not p.isascii()) > 200


def test_tokenizer_from_saved_pipeline_folder(tiny_sd, tmp_path):
    """transformers 5 saves tokenizer.json only; the C++ loader reads that form too."""
    model_dir, pipe = tiny_sd
    prompts = ["a photo of an astronaut riding a horse on mars", "Ünïcödé & 123!"]
    ref = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    inp = os.path.join(tmp_path, "p.json")
    out = os.path.join(tmp_path, "o.json")
    with open(inp, "w") as f:
        json.dump(prompts, f)
    run_bin("sd_probe", "tokenize", "--model", os.path.join(model_dir, "tokenizer"), "--inputs", inp, "--out", out)
    with open(out) as f:
        assert json.load(f) == ref
