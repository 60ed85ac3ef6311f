#include "sd/pipeline/stable_diffusion.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "sd/quant/unet_int8.h"
#include "sd/schedulers/scheduler.h"
#include "sd/util/status_macros.h"

namespace sd {

absl::StatusOr<torch::Dtype> ParseDtypeName(const std::string& name) {
  if (name == "fp32" || name == "float32") return torch::kFloat32;
  if (name == "fp16" || name == "float16") return torch::kFloat16;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype \"", name, "\" (fp32, fp16 or bf16)"));
}

namespace {

absl::Status ApplyLoras(const std::string& dir, const StableDiffusion::LoadOptions& options,
                        StableDiffusion& sd) {
  if (options.unet_int8)
    return absl::InvalidArgumentError(
        "LoRAs apply to float weights: use --unet float (the INT8 UNet's weights are quantized)");
  ModuleTable table;
  if (sd.unet) AddModules("unet", *sd.unet, &table);
  if (sd.text_encoder) AddModules("text_encoder", *sd.text_encoder, &table);
  const std::filesystem::path map_path = std::filesystem::path(dir) / "pruning_map.json";
  nlohmann::json pruning_map;
  if (std::filesystem::exists(map_path)) {
    ASSIGN_OR_RETURN(JsonConfig m, JsonConfig::Load(map_path.string()));
    pruning_map = m.json();
  }
  for (const LoraSpec& spec : options.loras) {
    ASSIGN_OR_RETURN(LoraFile lora, ReadLora(spec.path, table));
    if (!pruning_map.is_null()) RETURN_IF_ERROR(RemapToPruned(lora, pruning_map));
    const LoraFit fit = CheckLora(lora, table);
    if (!fit.mismatched.empty())
      return absl::InvalidArgumentError(
          absl::StrCat(spec.path, ": ", fit.mismatched[0].first, ": ", fit.mismatched[0].second));
    if (fit.fit.empty())
      return absl::InvalidArgumentError(absl::StrCat(
          spec.path, ": none of its ", lora.updates.size() + lora.unmappable.size(),
          " updates maps onto this model",
          lora.unmappable.empty() ? std::string()
                                  : absl::StrCat(" (first: ", lora.unmappable[0].first, ", ",
                                                 lora.unmappable[0].second, ")")));
    try {
      if (sd.unet) RETURN_IF_ERROR(ApplyLora(lora, fit, "unet", *sd.unet, spec.scale));
      if (sd.text_encoder)
        RETURN_IF_ERROR(ApplyLora(lora, fit, "text_encoder", *sd.text_encoder, spec.scale));
    } catch (const c10::Error& e) {
      return absl::InternalError(
          absl::StrCat(spec.path, ": applying it failed: ", e.what_without_backtrace()));
    }
    std::string note = absl::StrCat("lora ", spec.path, " (", lora.format, ", scale ", spec.scale,
                                    "): ", fit.fit.size(), " updates applied");
    if (!pruning_map.is_null()) {
      int64_t remapped = 0;
      for (const auto& u : lora.updates) remapped += u.remapped ? 1 : 0;
      absl::StrAppend(&note, ", ", remapped, " of them cut to the pruned widths");
    }
    if (!fit.missing.empty())
      absl::StrAppend(&note, "; ", fit.missing.size(), " name modules this model lacks (first ",
                      fit.missing[0].second, ")");
    if (!lora.unmappable.empty())
      absl::StrAppend(&note, "; ", lora.unmappable.size(), " keys unread (first ",
                      lora.unmappable[0].first, ": ", lora.unmappable[0].second, ")");
    sd.notes.push_back(std::move(note));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<StableDiffusion> StableDiffusion::Load(const std::string& dir,
                                                      const LoadOptions& options) {
  const torch::Device device = options.device;
  const torch::Dtype dtype = options.dtype;
  namespace fs = std::filesystem;
  const fs::path root(dir);
  if (!fs::exists(root / "model_index.json")) {
    return absl::NotFoundError(
        absl::StrCat(dir, " is not a diffusers model folder (no model_index.json)"));
  }
  ASSIGN_OR_RETURN(JsonConfig index, JsonConfig::Load((root / "model_index.json").string()));
  const std::pair<const char*, std::vector<std::string>> expected[] = {
      {"unet", {"UNet2DConditionModel"}},
      {"vae", {"AutoencoderKL"}},
      {"text_encoder", {"CLIPTextModel"}},
      {"tokenizer", {"CLIPTokenizer", "CLIPTokenizerFast"}},
  };
  for (const auto& [key, classes] : expected) {
    const auto& j = index.json();
    if (!j.contains(key) || !j[key].is_array() || j[key].size() != 2 || !j[key][1].is_string()) {
      return index.Error(key, "must name the component as [library, class]");
    }
    const std::string cls = j[key][1].get<std::string>();
    if (std::find(classes.begin(), classes.end(), cls) == classes.end()) {
      return index.Error(
          key, absl::StrCat("names class ", cls, ", which this build cannot load (expected ",
                            classes[0], ")"));
    }
  }
  StableDiffusion sd;
  if (options.tokenizer) {
    ASSIGN_OR_RETURN(sd.tokenizer, CLIPTokenizer::Load((root / "tokenizer").string()));
  }
  // Copies, not aliases of the mapping: the UNet and VAE are re-laid-out below
  // anyway (or trained), and copying with page release keeps peak memory at one
  // set of weights.
  if (options.text_encoder) {
    ASSIGN_OR_RETURN(sd.text_encoder, LoadCLIPTextModel((root / "text_encoder").string(), true));
  }
  if (options.unet && options.unet_int8) {
    const fs::path file = root / "unet_int8.safetensors";
    if (!fs::exists(file))
      return absl::NotFoundError(absl::StrCat(
          dir, " has no unet_int8.safetensors (the quantize stage writes it with int8: true)"));
    if (!device.is_cpu())
      return absl::InvalidArgumentError(
          absl::StrCat("the INT8 UNet runs on CPU only, not on ", device.str()));
    ASSIGN_OR_RETURN(sd.unet, quant::LoadUNetInt8(file.string()));
  } else if (options.unet) {
    ASSIGN_OR_RETURN(sd.unet, LoadUNet((root / "unet").string(), true));
  }
  if (options.vae) {
    ASSIGN_OR_RETURN(sd.vae, LoadVAE((root / "vae").string(), true));
  }
  ASSIGN_OR_RETURN(sd.scheduler_config,
                   JsonConfig::Load((root / "scheduler" / "scheduler_config.json").string()));
  if (sd.unet && sd.text_encoder &&
      sd.unet->config().cross_attention_dim != sd.text_encoder->config().hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": unet cross_attention_dim ", sd.unet->config().cross_attention_dim,
        " does not match text_encoder hidden_size ", sd.text_encoder->config().hidden_size));
  }
  if (!options.loras.empty()) RETURN_IF_ERROR(ApplyLoras(dir, options, sd));
  sd.device = device;
  sd.dtype = dtype;
  try {
    if (sd.text_encoder) sd.text_encoder->to(device, dtype);
    if (sd.unet) sd.unet->to(device, dtype);
    if (sd.vae) sd.vae->to(device, dtype);
    // Inference layout: NHWC convolutions and fused attention projections measured
    // about 10% faster on CPU (docs/benchmarks.md); the numbers stay within 1e-4.
    if (options.inference_layout) {
      if (sd.unet) {
        sd.unet->set_channels_last(true);
        sd.unet->fuse_qkv_projections(true);
      }
      if (sd.vae) sd.vae->set_channels_last(true);
    }
  } catch (const c10::Error& e) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot move the model to ", device.str(), ": ", e.what_without_backtrace()));
  }
  return sd;
}

int64_t StableDiffusion::vae_scale_factor() const {
  return int64_t{1} << (vae->config().block_out_channels.size() - 1);
}

torch::Tensor StableDiffusion::EncodePrompts(const std::vector<std::string>& prompts) {
  auto ids = tokenizer.Tokenize(prompts).to(device);
  return text_encoder->forward(ids).last_hidden_state;
}

absl::Status ValidateInferenceOptions(const InferenceOptions& o) {
  if (o.attention_slice < 0 && o.attention_slice != kAttentionSliceAuto)
    return absl::InvalidArgumentError(absl::StrCat(
        "attention slice size must be >= 0 (0: off) or auto, got ", o.attention_slice));
  if (o.tome && o.cuda_graphs)
    return absl::InvalidArgumentError(
        "CUDA graphs and token merging do not combine: merging draws its destinations on the "
        "CPU each step, which a captured graph would replay frozen; drop one of them");
  if (!o.tome) return absl::OkStatus();
  const ToMeOptions& t = *o.tome;
  if (t.sx < 1 || t.sy < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("token merging strides must be >= 1, got sx=", t.sx, " sy=", t.sy));
  // Each sy x sx window keeps one destination, so at most 1 - 1/(sx*sy) of the
  // tokens can go (tomesd clamps silently; a user asking for more should know).
  const double max_ratio = 1.0 - 1.0 / static_cast<double>(t.sx * t.sy);
  if (!(t.ratio > 0) || t.ratio > max_ratio)
    return absl::InvalidArgumentError(absl::StrCat("token merging ratio must be in (0, ", max_ratio,
                                                   "] for sx=", t.sx, " sy=", t.sy, ", got ",
                                                   t.ratio));
  if (t.max_downsample != 1 && t.max_downsample != 2 && t.max_downsample != 4 &&
      t.max_downsample != 8)
    return absl::InvalidArgumentError(
        absl::StrCat("token merging max_downsample must be 1, 2, 4 or 8, got ", t.max_downsample));
  if (!t.merge_attn && !t.merge_crossattn && !t.merge_mlp)
    return absl::InvalidArgumentError(
        "token merging on, but none of self-attention, cross-attention or MLP is merged");
  return absl::OkStatus();
}

nlohmann::json InferenceOptionsJson(const InferenceOptions& o) {
  nlohmann::json j = {{"attention_slice", o.attention_slice == kAttentionSliceAuto
                                              ? nlohmann::json("auto")
                                              : nlohmann::json(o.attention_slice)},
                      {"vae_slicing", o.vae_slicing},
                      {"vae_tiling", o.vae_tiling},
                      {"sdpa", SdpaBackendName(o.sdpa)},
                      {"cuda_graphs", o.cuda_graphs},
                      {"tome", nullptr}};
  if (o.tome) {
    const ToMeOptions& t = *o.tome;
    j["tome"] = {{"ratio", t.ratio},
                 {"max_downsample", t.max_downsample},
                 {"sx", t.sx},
                 {"sy", t.sy},
                 {"use_rand", t.use_rand},
                 {"merge_attn", t.merge_attn},
                 {"merge_crossattn", t.merge_crossattn},
                 {"merge_mlp", t.merge_mlp}};
  }
  return j;
}

absl::Status ApplyInferenceOptions(UNet2DConditionModelImpl& unet, const InferenceOptions& o,
                                   uint64_t seed, const torch::Device& device) {
  RETURN_IF_ERROR(ValidateInferenceOptions(o));
  RETURN_IF_ERROR(CheckSdpaBackend(o.sdpa, device));
  if (o.tome) {
    ToMeOptions tome = *o.tome;
    tome.seed = seed;  // a new generator per call: same seed, same picture
    unet.set_token_merging(tome);
  } else {
    unet.set_token_merging(std::nullopt);
  }
  unet.set_attention_slice(o.attention_slice);
  SetSdpaBackend(unet, o.sdpa);
  return absl::OkStatus();
}

torch::Tensor DecodeLatents(AutoencoderKLImpl& vae, const torch::Tensor& z,
                            const InferenceOptions& o) {
  SetSdpaBackend(vae, o.sdpa);
  // diffusers' order: the batch one image at a time first, then tiles of each.
  const auto one = [&](const torch::Tensor& zi) {
    return o.vae_tiling ? vae.decode_tiled(zi) : vae.decode(zi);
  };
  if (!o.vae_slicing || z.size(0) == 1) return one(z);
  std::vector<torch::Tensor> parts;
  for (int64_t i = 0; i < z.size(0); ++i) parts.push_back(one(z.slice(0, i, i + 1)));
  return torch::cat(parts, 0);
}

absl::StatusOr<torch::Tensor> Generate(StableDiffusion& sd, const GenerateOptions& o) {
  if (o.prompts.empty()) return absl::InvalidArgumentError("no prompt given");
  if (!o.negative_prompts.empty() && o.negative_prompts.size() != o.prompts.size()) {
    return absl::InvalidArgumentError(absl::StrCat(o.negative_prompts.size(),
                                                   " negative prompts for ", o.prompts.size(),
                                                   " prompts; give one per prompt or none"));
  }
  if (o.steps < 1 || o.steps > 1000)
    return absl::InvalidArgumentError(absl::StrCat("steps must be in [1, 1000], got ", o.steps));
  const int64_t f = sd.vae_scale_factor();
  const int64_t height = o.height > 0 ? o.height : sd.unet->config().sample_size * f;
  const int64_t width = o.width > 0 ? o.width : sd.unet->config().sample_size * f;
  if (height % 8 != 0 || width % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("height and width must be multiples of 8, got ", height, "x", width));
  }
  // A CFG-distilled UNet has guidance baked in (one pass per step, as diffusers
  // runs it): there is no unconditional pass for a negative prompt to replace.
  const int64_t guidance_dim = sd.unet->config().time_cond_proj_dim;
  if (guidance_dim > 0) {
    for (const auto& neg : o.negative_prompts) {
      if (!neg.empty())
        return absl::InvalidArgumentError(
            "this model is CFG-distilled (unet time_cond_proj_dim): guidance is one UNet pass "
            "with the guidance scale as input, and a negative prompt would be ignored; drop "
            "--negative-prompt");
    }
  }
  ASSIGN_OR_RETURN(auto scheduler, MakeScheduler(o.scheduler, sd.scheduler_config));
  RETURN_IF_ERROR(ApplyInferenceOptions(*sd.unet, o.inference, o.seed, sd.device));
  SetSdpaBackend(*sd.text_encoder, o.inference.sdpa);
  try {
    torch::InferenceMode guard;
    const bool cfg = o.guidance_scale > 1.0 && guidance_dim == 0;
    const int64_t n = static_cast<int64_t>(o.prompts.size()) * o.images_per_prompt;
    auto cond = sd.EncodePrompts(o.prompts).repeat_interleave(o.images_per_prompt, 0);
    torch::Tensor context = cond;
    if (cfg) {
      std::vector<std::string> neg = o.negative_prompts.empty()
                                         ? std::vector<std::string>(o.prompts.size(), "")
                                         : o.negative_prompts;
      auto uncond = sd.EncodePrompts(neg).repeat_interleave(o.images_per_prompt, 0);
      context = torch::cat({uncond, cond}, 0);
    }
    scheduler->SetTimesteps(o.steps);
    const std::vector<int64_t> shape = {n, sd.unet->config().in_channels, height / f, width / f};
    torch::Tensor latents;
    if (o.latents.defined()) {
      if (o.latents.sizes().vec() != shape) {
        return absl::InvalidArgumentError(
            absl::StrCat("initial latents have shape ", c10::str(o.latents.sizes()),
                         " but this model and size need ", c10::str(c10::IntArrayRef(shape))));
      }
      latents = o.latents.to(sd.device, sd.dtype);
    } else {
      // Same stream as diffusers' randn_tensor with torch.Generator("cpu").manual_seed(seed)
      // in fp32. Drawn in fp32 for every dtype, so a seed gives the same picture in
      // fp16/bf16 too (drawing in bf16 would give a different stream).
      auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
      latents = at::randn(shape, gen, torch::TensorOptions().dtype(torch::kFloat32))
                    .to(sd.device, sd.dtype);
    }
    latents = latents * scheduler->init_noise_sigma();
    torch::Tensor guidance_cond;  // diffusers embeds guidance_scale - 1
    if (guidance_dim > 0)
      guidance_cond = GuidanceScaleEmbedding(torch::full({n}, o.guidance_scale - 1.0), guidance_dim)
                          .to(sd.device, sd.dtype);
    const auto& ts = scheduler->timesteps();
    UNetGraph* graph = nullptr;
    if (o.inference.cuda_graphs && sd.device.is_cuda()) {
      if (!sd.unet_graph) sd.unet_graph = std::make_shared<UNetGraph>(sd.unet);
      graph = sd.unet_graph.get();
    }
    for (size_t i = 0; i < ts.size(); ++i) {
      auto input = cfg ? torch::cat({latents, latents}, 0) : latents;
      input = scheduler->ScaleModelInput(input, i);
      auto t = torch::tensor(static_cast<float>(ts[i]), torch::TensorOptions().device(sd.device));
      auto eps = graph ? graph->Forward(input, t, context, guidance_cond)
                       : sd.unet->forward(input, t, context, guidance_cond);
      if (cfg) {
        auto parts = eps.chunk(2, 0);
        eps = parts[0] + o.guidance_scale * (parts[1] - parts[0]);
      }
      latents = scheduler->Step(eps, i, latents);
      if (o.on_step) o.on_step(static_cast<int64_t>(i) + 1, static_cast<int64_t>(ts.size()));
    }
    auto z = latents / sd.vae->config().scaling_factor;
    if (o.on_final_latents) o.on_final_latents(z);
    auto images = DecodeLatents(*sd.vae, z, o.inference);
    images = (images.to(torch::kFloat32) / 2 + 0.5).clamp(0, 1);
    return images.permute({0, 2, 3, 1}).contiguous().to(torch::kCPU);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("generation failed: ", e.what_without_backtrace()));
  }
}

int64_t DistilledSteps(const std::string& model_dir) {
  std::ifstream f(std::filesystem::path(model_dir) / "distillation.json");
  if (!f) return 0;
  const auto j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  return j.is_object() && j.contains("steps") && j["steps"].is_number_integer()
             ? j["steps"].get<int64_t>()
             : 0;
}

}  // namespace sd
