#include "cli/flags/inference_flags.h"

#include "absl/strings/str_cat.h"
#include "sd/util/status_macros.h"

namespace sdcli {

const std::vector<std::string>& InferenceValueFlags() {
  static const std::vector<std::string> flags = {"tome",    "tome-max-downsample", "tome-sx",
                                                 "tome-sy", "attention-slice",     "sdpa"};
  return flags;
}

const std::vector<std::string>& InferenceSwitches() {
  static const std::vector<std::string> flags = {"tome-no-rand",   "tome-merge-crossattn",
                                                 "tome-merge-mlp", "vae-slicing",
                                                 "vae-tiling",     "cuda-graphs"};
  return flags;
}

const char* InferenceFlagsUsage() {
  return "  --tome RATIO               token merging (tomesd) at this ratio, e.g. 0.5\n"
         "  --tome-max-downsample N    merge in blocks downsampled at most N times (1)\n"
         "  --tome-sx N --tome-sy N    destination window (2 x 2)\n"
         "  --tome-no-rand             top-left destination per window instead of random\n"
         "  --tome-merge-crossattn     also merge around cross-attention\n"
         "  --tome-merge-mlp           also merge around the feed-forward\n"
         "  --attention-slice N|auto|max  UNet attention N (batch x head) slices at a time\n"
         "  --sdpa auto|math|flash|efficient|cudnn  attention kernel (efficient, cudnn: CUDA)\n"
         "  --cuda-graphs              capture the UNet step once and replay it (CUDA)\n"
         "  --vae-slicing              decode one image at a time\n"
         "  --vae-tiling               decode large images in overlapping tiles\n";
}

absl::StatusOr<sd::InferenceOptions> ParseInferenceFlags(const sd::Args& args) {
  sd::InferenceOptions o;
  if (args.Has("tome")) {
    sd::ToMeOptions t;
    ASSIGN_OR_RETURN(t.ratio, args.Double("tome", t.ratio));
    ASSIGN_OR_RETURN(t.max_downsample, args.Int("tome-max-downsample", t.max_downsample));
    ASSIGN_OR_RETURN(t.sx, args.Int("tome-sx", t.sx));
    ASSIGN_OR_RETURN(t.sy, args.Int("tome-sy", t.sy));
    t.use_rand = !args.Has("tome-no-rand");
    t.merge_crossattn = args.Has("tome-merge-crossattn");
    t.merge_mlp = args.Has("tome-merge-mlp");
    o.tome = t;
  } else {
    for (const char* f : {"tome-max-downsample", "tome-sx", "tome-sy", "tome-no-rand",
                          "tome-merge-crossattn", "tome-merge-mlp"}) {
      if (args.Has(f))
        return absl::InvalidArgumentError(
            absl::StrCat("--", f, " configures token merging: give --tome RATIO too"));
    }
  }
  const std::string slice = args.Get("attention-slice", "0");
  if (slice == "auto") {
    o.attention_slice = sd::kAttentionSliceAuto;
  } else if (slice == "max") {
    o.attention_slice = 1;
  } else {
    ASSIGN_OR_RETURN(o.attention_slice, args.Int("attention-slice", 0));
    if (o.attention_slice < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("--attention-slice must be a count >= 0, auto or max, got ", slice));
  }
  if (args.Has("sdpa")) {
    auto b = sd::ParseSdpaBackend(args.Get("sdpa", ""));
    if (!b.ok()) return absl::InvalidArgumentError(absl::StrCat("--sdpa: ", b.status().message()));
    o.sdpa = *b;
  }
  o.cuda_graphs = args.Has("cuda-graphs");
  o.vae_slicing = args.Has("vae-slicing");
  o.vae_tiling = args.Has("vae-tiling");
  RETURN_IF_ERROR(sd::ValidateInferenceOptions(o));
  return o;
}

const char* ModelLoadFlagsUsage() {
  return "  --device cpu|cuda[:N]      where to run (cpu)\n"
         "  --dtype fp32|fp16|bf16     weights and activations (fp32; fp16 needs CUDA)\n"
         "  --unet float|int8          int8: the model's unet_int8.safetensors (CPU)\n"
         "  --lora FILE[:SCALE]        fuse a LoRA (kohya or diffusers/PEFT), repeatable\n";
}

absl::StatusOr<sd::StableDiffusion::LoadOptions> ParseModelLoadFlags(const sd::Args& args) {
  sd::StableDiffusion::LoadOptions load;
  ASSIGN_OR_RETURN(load.dtype, sd::ParseDtypeName(args.Get("dtype", "fp32")));
  const std::string dev = args.Get("device", "cpu");
  if (dev != "cpu" && dev.rfind("cuda", 0) != 0)
    return absl::InvalidArgumentError(absl::StrCat("--device must be cpu or cuda, got ", dev));
  if (dev != "cpu" && !torch::cuda::is_available())
    return absl::FailedPreconditionError(
        "--device cuda asked for, but no CUDA device is available");
  if (dev == "cpu" && load.dtype == torch::kFloat16)
    return absl::InvalidArgumentError("--dtype fp16 needs --device cuda (use fp32 or bf16 on CPU)");
  load.device = torch::Device(dev);
  const std::string unet = args.Get("unet", "float");
  if (unet != "float" && unet != "int8")
    return absl::InvalidArgumentError(absl::StrCat(
        "--unet must be float or int8 (the model's unet_int8.safetensors), got ", unet));
  load.unet_int8 = unet == "int8";
  for (const std::string& l : args.All("lora")) {
    ASSIGN_OR_RETURN(sd::LoraSpec spec, sd::ParseLoraSpec(l));
    load.loras.push_back(std::move(spec));
  }
  return load;
}

std::vector<std::string> Concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace sdcli
