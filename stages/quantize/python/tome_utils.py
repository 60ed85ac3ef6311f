"""Token merging (ToMe) for a diffusers pipeline loaded from this folder.

Written here by sdcompress's quantize stage, for users who take the model into Python. The C++
side (`sdctl generate --tome 0.5`) is the same algorithm and matches these helpers' `apply_tome`
within 1e-4. Needs `pip install tomesd`.

    from diffusers import StableDiffusionPipeline
    from output.quant.tome_utils import apply_tome
    pipe = StableDiffusionPipeline.from_pretrained("./output/quant")
    apply_tome(pipe, ratio=0.5)          # tomesd on every transformer block

or, module by module (the form the pipeline's README shows):

    for name, module in pipe.unet.named_modules():
        if "attn" in name:
            apply_tome_to_attention(module, ratio=0.5)

How much it saves depends on the image size: at 512x512 with fused attention (SDPA) the gain is
small or nothing, it grows at 768 and 1024 (see docs/benchmarks.md of sdcompress).
"""
import math

import torch

__all__ = ["apply_tome", "remove_tome", "apply_tome_to_attention", "remove_tome_from_attention"]


def _tomesd():
    try:
        import tomesd
    except ImportError as e:  # the one dependency beyond diffusers
        raise ImportError("tome_utils needs the tomesd package: pip install tomesd") from e
    return tomesd


def apply_tome(pipe, ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=True, merge_attn=True,
               merge_crossattn=False, merge_mlp=False):
    """tomesd.apply_patch on a pipeline or a UNet; returns it. ratio: the fraction of tokens merged
    away (at most 1 - 1/(sx*sy)); the rest are tomesd's arguments with its defaults."""
    if not 0 < ratio <= 1 - 1 / (sx * sy):
        raise ValueError(f"ratio must be in (0, {1 - 1 / (sx * sy)}] for sx={sx} sy={sy}, got {ratio}")
    return _tomesd().apply_patch(pipe, ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy,
                                 use_rand=use_rand, merge_attn=merge_attn, merge_crossattn=merge_crossattn,
                                 merge_mlp=merge_mlp)


def remove_tome(pipe):
    return _tomesd().remove_patch(pipe)


# The latent size of the UNet forward under way. An attention module does not know the image it
# works on; one process-wide pre-hook notes it when any UNet starts a forward. Global hooks see
# positional arguments only, which is how diffusers' pipelines pass the sample; a UNet called
# with sample= by keyword leaves the size unknown and its attention unmerged.
_latent = {"size": None, "hook": None, "generators": {}}


def _note_latent_size(module, args):
    if type(module).__name__ == "UNet2DConditionModel":
        sample = args[0] if args else None
        _latent["size"] = tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) and sample.dim() == 4 \
            else None


def _generator(device):
    # As tomesd: forked from the global generator on first use, so torch.manual_seed(s) before
    # generating makes the destinations reproducible.
    g = _latent["generators"].get(device)
    if g is None:
        g = torch.Generator(device=device)
        g.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        _latent["generators"][device] = g
    return g


def apply_tome_to_attention(module, ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=True):
    """Merges tokens around one diffusers self-attention module (attn1 of a transformer block):
    the module's input is merged to (1 - ratio) of its tokens, attended, and unmerged. Anything
    else (cross-attention, the projections inside, other modules) is left alone and False is
    returned, so the loop over named_modules() above is safe. Only modules whose resolution is
    at most `max_downsample` times below the latent's merge, as tomesd.

    One difference from apply_tome: tomesd measures token similarity on the block's input, this
    module only sees it after the block's LayerNorm, so the pairs can differ slightly."""
    if type(module).__name__ != "Attention" or getattr(module, "is_cross_attention", True):
        return False
    if not 0 < ratio <= 1 - 1 / (sx * sy):
        raise ValueError(f"ratio must be in (0, {1 - 1 / (sx * sy)}] for sx={sx} sy={sy}, got {ratio}")
    merge_fn = _tomesd().merge.bipartite_soft_matching_random2d
    if _latent["hook"] is None:
        _latent["hook"] = torch.nn.modules.module.register_module_forward_pre_hook(_note_latent_size)
    remove_tome_from_attention(module)
    original = module.forward
    args = {"ratio": ratio, "max_downsample": max_downsample, "sx": sx, "sy": sy, "use_rand": use_rand}

    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        size = _latent["size"]
        if encoder_hidden_states is not None or size is None or hidden_states.dim() != 3:
            return original(hidden_states, encoder_hidden_states, attention_mask, **kw)
        h0, w0 = size
        n = hidden_states.shape[1]
        downsample = int(math.ceil(math.sqrt((h0 * w0) // n)))
        if downsample > args["max_downsample"]:
            return original(hidden_states, encoder_hidden_states, attention_mask, **kw)
        w, h = int(math.ceil(w0 / downsample)), int(math.ceil(h0 / downsample))
        # An odd batch holds no prompt/unconditional pairs: tomesd turns randomness off there.
        rand = args["use_rand"] and hidden_states.shape[0] % 2 == 0
        merge, unmerge = merge_fn(hidden_states, w, h, args["sx"], args["sy"], int(n * args["ratio"]),
                                  no_rand=not rand, generator=_generator(hidden_states.device) if rand else None)
        return unmerge(original(merge(hidden_states), None, attention_mask, **kw))

    module.forward = forward
    module._tome_original_forward = original
    return True


def remove_tome_from_attention(module):
    original = getattr(module, "_tome_original_forward", None)
    if original is not None:
        module.forward = original
        del module._tome_original_forward

