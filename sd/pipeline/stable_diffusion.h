#pragma once
// Text-to-image with classifier-free guidance, step for step as diffusers'
// StableDiffusionPipeline.
#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/lora.h"
#include "sd/models/token_merging.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/pipeline/cuda_graph.h"
#include "sd/tokenizer/clip_tokenizer.h"

namespace sd {

struct StableDiffusion {
  CLIPTokenizer tokenizer;
  CLIPTextModel text_encoder{nullptr};
  UNet2DConditionModel unet{nullptr};
  AutoencoderKL vae{nullptr};
  JsonConfig scheduler_config;
  torch::Device device = torch::kCPU;
  torch::Dtype dtype = torch::kFloat32;
  // The captured denoising step when --cuda-graphs is on (kept across Generate
  // calls, so a server's next batch of the same shape replays without capturing).
  std::shared_ptr<UNetGraph> unet_graph;
  // What loading did that a user should hear about (LoRA updates applied and
  // those with no module here).
  std::vector<std::string> notes;

  struct LoadOptions {
    torch::Device device = torch::kCPU;
    torch::Dtype dtype = torch::kFloat32;
    // Channels-last convolutions and fused attention projections: faster for
    // sampling, but they change parameter layouts, so training loads without.
    bool inference_layout = true;
    // Which of tokenizer, text_encoder, unet, vae to load (the scheduler config
    // always is); the others stay null. A training stage loads what it trains and uses.
    bool tokenizer = true, text_encoder = true, unet = true, vae = true;
    // The UNet from <dir>/unet_int8.safetensors (the quantize stage's INT8 UNet,
    // CPU only) instead of unet/.
    bool unet_int8 = false;
    // LoRAs fused into the UNet and text encoder weights (W += scale * alpha/r *
    // up @ down, as diffusers' fuse_lora), before the inference layout fuses the
    // projections. On a pruned folder each is first cut to the kept channels
    // with its pruning_map.json.
    std::vector<LoraSpec> loras;
  };
  // Loads a diffusers folder (model_index.json, tokenizer/, text_encoder/, unet/,
  // vae/, scheduler/): the one loading path of sampling, evaluation and training.
  static absl::StatusOr<StableDiffusion> Load(const std::string& dir, const LoadOptions& options);
  static absl::StatusOr<StableDiffusion> Load(const std::string& dir,
                                              torch::Device device = torch::kCPU,
                                              torch::Dtype dtype = torch::kFloat32) {
    LoadOptions o;
    o.device = device;
    o.dtype = dtype;
    return Load(dir, o);
  }
  int64_t vae_scale_factor() const;
  // [B, 77, D] prompt embeddings (last_hidden_state).
  torch::Tensor EncodePrompts(const std::vector<std::string>& prompts);
};

// Speed/memory trade-offs that leave the model as it is (sdctl generate, sdctl
// eval and the server take the same flags, see AddInferenceFlags).
inline constexpr int64_t kAttentionSliceAuto = -1;
struct InferenceOptions {
  std::optional<ToMeOptions> tome;  // token merging; its seed is the generation's seed
  // UNet attention in chunks of this many (batch x head) slices; kAttentionSliceAuto:
  // half of each layer's heads (diffusers' "auto"); 0: off.
  int64_t attention_slice = 0;
  bool vae_slicing = false;  // decode one image at a time
  bool vae_tiling = false;   // decode large latents in overlapping tiles
  // The attention kernel of the text encoder, UNet and VAE (see SdpaBackend).
  SdpaBackend sdpa = SdpaBackend::kAuto;
  // Capture the UNet step in a CUDA graph and replay it (see UNetGraph); on other
  // devices the step runs eagerly.
  bool cuda_graphs = false;
};

// Names the bad option (ratio range, strides, slice size).
absl::Status ValidateInferenceOptions(const InferenceOptions& o);
// For reports: what an evaluation or benchmark ran with.
nlohmann::json InferenceOptionsJson(const InferenceOptions& o);

// Puts `o` on a UNet: token merging (its destination generator from `seed`),
// attention slicing and the attention backend, which must exist on `device`.
absl::Status ApplyInferenceOptions(UNet2DConditionModelImpl& unet, const InferenceOptions& o,
                                   uint64_t seed, const torch::Device& device);

// Unscaled latents -> images in about [-1, 1], with the VAE slicing and tiling asked for.
torch::Tensor DecodeLatents(AutoencoderKLImpl& vae, const torch::Tensor& z,
                            const InferenceOptions& o);

struct GenerateOptions {
  std::vector<std::string> prompts;
  std::vector<std::string> negative_prompts;  // empty: "" for each prompt
  int64_t steps = 50;
  double guidance_scale = 7.5;
  uint64_t seed = 0;
  std::string scheduler = "default";  // default: the model's own scheduler_config class
  int64_t height = 0, width = 0;      // 0: unet sample_size * vae scale factor
  int64_t images_per_prompt = 1;
  torch::Tensor latents;  // optional initial latents [B, C, h, w] (before init_noise_sigma scaling)
  InferenceOptions inference;
  std::function<void(int64_t step, int64_t total)> on_step;
  // Receives the final (unscaled) latents before they are decoded.
  std::function<void(const torch::Tensor& latents)> on_final_latents;
};

// Returns images [B, H, W, 3] float32 in [0, 1] on CPU.
absl::StatusOr<torch::Tensor> Generate(StableDiffusion& sd, const GenerateOptions& options);

// The step count a distilled model folder was made for (its distillation.json,
// written by the distillation stages), or 0 for an undistilled one.
int64_t DistilledSteps(const std::string& model_dir);

absl::StatusOr<torch::Dtype> ParseDtypeName(const std::string& name);

}  // namespace sd
