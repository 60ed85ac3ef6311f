#pragma once
// AutoencoderKL (diffusers), shapes from vae/config.json.
#include <torch/torch.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/io/json_config.h"
#include "sd/models/layers.h"
#include "sd/onnx/graph.h"

namespace sd {

struct VAEConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels;
  int64_t layers_per_block = 2;
  int64_t norm_num_groups = 32;
  int64_t sample_size = 512;
  double scaling_factor = 0.18215;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  static absl::StatusOr<VAEConfig> FromJson(const JsonConfig& c);
  nlohmann::json ToJson() const;
};

struct VAEMidBlockImpl : torch::nn::Module {
  VAEMidBlockImpl(int64_t channels, int64_t groups, bool attention);
  torch::Tensor forward(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x) const;
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
};
TORCH_MODULE(VAEMidBlock);

struct VAEBlockImpl : torch::nn::Module {
  torch::nn::ModuleList resnets{nullptr}, samplers{nullptr};
};
TORCH_MODULE(VAEBlock);

struct VAEEncoderImpl : torch::nn::Module {
  explicit VAEEncoderImpl(const VAEConfig& c);
  torch::Tensor forward(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x) const;
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  VAEMidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VAEEncoder);

struct VAEDecoderImpl : torch::nn::Module {
  explicit VAEDecoderImpl(const VAEConfig& c);
  torch::Tensor forward(const torch::Tensor& z);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& z) const;
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  VAEMidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VAEDecoder);

struct LatentDistribution {
  torch::Tensor mean, logvar;
  torch::Tensor std() const { return torch::exp(0.5 * logvar); }
  torch::Tensor sample(const std::optional<at::Generator>& gen = std::nullopt) const;
};

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const VAEConfig& config);
  // images in [-1, 1] -> posterior over (unscaled) latents
  LatentDistribution encode(const torch::Tensor& images);
  // unscaled latents -> images in about [-1, 1]
  torch::Tensor decode(const torch::Tensor& latents);
  // VAE tiling as diffusers' enable_vae_tiling: latents larger than the VAE's
  // sample_size / 8 are decoded in overlapping tiles of that size (a quarter
  // overlap) blended linearly at the seams, so peak memory stays that of one
  // tile; smaller latents decode whole. encode_tiled is the same for images.
  torch::Tensor decode_tiled(const torch::Tensor& latents);
  LatentDistribution encode_tiled(const torch::Tensor& images);
  // float32 graphs, batch and spatial axes symbolic. Decoder: latent_sample
  // (unscaled latents) -> sample, as decode. Encoder: sample (images in [-1, 1]) ->
  // latent_parameters, the posterior's mean and logvar concatenated on channels
  // (logvar not yet clamped), as quant_conv(encoder(x)).
  absl::StatusOr<onnx::Graph> ExportOnnxDecoder() const;
  absl::StatusOr<onnx::Graph> ExportOnnxEncoder() const;
  const VAEConfig& config() const { return config_; }
  VAEConfig& mutable_config() { return config_; }
  // NHWC weights and activations (see ToChannelsLast); outputs are NCHW-contiguous.
  void set_channels_last(bool on);

  VAEEncoder encoder{nullptr};
  VAEDecoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};

 private:
  torch::Tensor encode_moments(const torch::Tensor& images);
  int64_t latent_tile() const;

  VAEConfig config_;
  bool channels_last_ = false;
};
TORCH_MODULE(AutoencoderKL);

absl::StatusOr<AutoencoderKL> LoadVAE(const std::string& dir, bool copy_weights = false);

}  // namespace sd
