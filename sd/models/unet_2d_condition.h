#pragma once
// UNet2DConditionModel (diffusers), shapes from unet/config.json.
#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/io/json_config.h"
#include "sd/models/layers.h"
#include "sd/onnx/graph.h"

namespace sd {

struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  int64_t sample_size = 64;
  std::vector<std::string> down_block_types;
  std::vector<std::string> up_block_types;
  bool mid_block = true;
  std::vector<int64_t> block_out_channels;
  int64_t layers_per_block = 2;
  std::vector<int64_t>
      num_attention_heads;  // per down block (diffusers' attention_head_dim quirk resolved)
  std::vector<int64_t> transformer_layers_per_block;
  int64_t cross_attention_dim = 768;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  bool center_input_sample = false;
  // > 0: a guidance-conditioned (CFG-distilled) UNet, as LCM's: the time
  // embedding adds cond_proj(GuidanceScaleEmbedding(w)) before linear_1.
  int64_t time_cond_proj_dim = 0;
  // > 0: the time embedding's width (diffusers' time_embedding_dim); 0: 4x
  // block_out_channels[0]. A pruned UNet keeps its unpruned width this way.
  int64_t time_embedding_dim = 0;
  int64_t temb_dim() const {
    return time_embedding_dim > 0 ? time_embedding_dim : 4 * block_out_channels[0];
  }

  static absl::StatusOr<UNetConfig> FromJson(const JsonConfig& c);
  nlohmann::json ToJson() const;
};

struct UNetBlockImpl : torch::nn::Module {
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr}, downsamplers{nullptr},
      upsamplers{nullptr};
};
TORCH_MODULE(UNetBlock);

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNetConfig& config);

  // sample [B, C, H, W]; timestep a scalar or [B]; encoder_hidden_states [B, T, D];
  // timestep_cond [B, time_cond_proj_dim] (only with a time_cond_proj_dim; undefined:
  // no guidance term, as diffusers with timestep_cond=None).
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states,
                        const torch::Tensor& timestep_cond = {});

  const UNetConfig& config() const { return config_; }
  // The float32 graph of forward: inputs sample [batch, C, height, width],
  // timestep [batch or 1] (float), encoder_hidden_states [batch, sequence, D] (and
  // timestep_cond [batch, time_cond_proj_dim] with a time_cond_proj_dim); output
  // out_sample. Batch, spatial and sequence axes are symbolic.
  absl::StatusOr<onnx::Graph> ExportOnnx() const;
  // Turn on to collect every attention map of the next forward in recorder().
  AttentionRecorder& recorder() { return *recorder_; }
  // NHWC weights and activations (see ToChannelsLast); the output is contiguous NCHW either way.
  void set_channels_last(bool on);
  bool channels_last() const { return channels_last_; }
  // See AttentionImpl::fuse_projections.
  void fuse_qkv_projections(bool on);
  // Token merging (tomesd) in every transformer block; nullopt turns it off. A new
  // call restarts the destination generator from options.seed.
  void set_token_merging(const std::optional<ToMeOptions>& options);
  bool token_merging() const { return tome_ != nullptr; }
  // Attention in chunks of `slice_size` (batch x head) slices (diffusers'
  // enable_attention_slicing); 0: all at once.
  void set_attention_slice(int64_t slice_size);
  // While set, each forward appends to `out` the output of every down block, the
  // mid block and every up block, in that order (feature distillation); null: off.
  void record_block_outputs(std::vector<torch::Tensor>* out) { block_outputs_ = out; }

 private:
  UNetConfig config_;
  std::shared_ptr<AttentionRecorder> recorder_;
  std::shared_ptr<TokenMergingState> tome_;
  bool channels_last_ = false;
  std::vector<torch::Tensor>* block_outputs_ = nullptr;
  Conv2d conv_in{nullptr}, conv_out{nullptr};
  Linear time_linear_1{nullptr}, time_linear_2{nullptr}, time_cond_proj{nullptr};
  torch::nn::ModuleList down_blocks{nullptr}, up_blocks{nullptr};
  UNetBlock mid{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(UNet2DConditionModel);

// diffusers' get_guidance_scale_embedding: sinusoidal features of w * 1000, [B, dim]
// float32. Its pipelines pass w = guidance_scale - 1.
torch::Tensor GuidanceScaleEmbedding(const torch::Tensor& w, int64_t dim);

// Loads unet/ (config.json + weights) from a diffusers component folder.
absl::StatusOr<UNet2DConditionModel> LoadUNet(const std::string& dir, bool copy_weights = false);

}  // namespace sd
