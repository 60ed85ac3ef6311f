"""torch.compile for a diffusers pipeline loaded from this folder.

Written here by sdcompress's quantize stage, for users who take the model into Python (the C++
pipeline has its own counterpart: channels-last, fused projections and, on CUDA, graph replay).

    from output.quant.compile_utils import load_compiled_pipeline
    pipe = load_compiled_pipeline("./output/quant")
    image = pipe("a cat", num_inference_steps=4).images[0]

The first call compiles (minutes for the full UNet; the first image is slow), later calls with
the same image size and batch reuse the compiled graphs. On CUDA the default mode is
"reduce-overhead" (CUDA graphs); on CPU, where there are no CUDA graphs, "default".
"""
import torch

__all__ = ["load_compiled_pipeline", "compile_pipeline"]


def compile_pipeline(pipe, mode=None, fullgraph=False, compile_vae=True, channels_last=True, fuse_qkv=True):
    """Compiles a loaded pipeline's UNet (and the VAE decoder) in place; returns the pipeline."""
    device = pipe.unet.device
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    if fuse_qkv and hasattr(pipe.unet, "fuse_qkv_projections"):
        pipe.unet.fuse_qkv_projections()
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=fullgraph)
    if compile_vae:
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode, fullgraph=fullgraph)
    return pipe


def load_compiled_pipeline(path, torch_dtype=None, device=None, mode=None, fullgraph=False, compile_vae=True,
                           **from_pretrained_kwargs):
    """StableDiffusionPipeline.from_pretrained(path) on `device` (CUDA when there is one) in
    `torch_dtype` (fp16 on CUDA, fp32 on CPU), then compile_pipeline."""
    from diffusers import StableDiffusionPipeline

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch_dtype is None:
        torch_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    from_pretrained_kwargs.setdefault("safety_checker", None)
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, **from_pretrained_kwargs)
    pipe = pipe.to(device)
    return compile_pipeline(pipe, mode=mode, fullgraph=fullgraph, compile_vae=compile_vae)
