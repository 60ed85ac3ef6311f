#pragma once
// CLIPTextModel (transformers), shapes from text_encoder/config.json.
#include <torch/torch.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/io/json_config.h"
#include "sd/models/layers.h"
#include "sd/onnx/graph.h"

namespace sd {

struct CLIPTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
  int64_t eos_token_id = 2;
  int64_t projection_dim = 768;

  static absl::StatusOr<CLIPTextConfig> FromJson(const JsonConfig& c);
  nlohmann::json ToJson() const;
};

struct CLIPTextOutput {
  torch::Tensor last_hidden_state;           // after final_layer_norm
  torch::Tensor pooler_output;               // last_hidden_state at the EOS token
  std::vector<torch::Tensor> hidden_states;  // embeddings, then each layer's output
  // Each layer's attention probabilities [B, heads, T, T], when asked for.
  std::vector<torch::Tensor> attentions;
};

struct CLIPAttentionImpl : torch::nn::Module, UsesSdpa {
  CLIPAttentionImpl(int64_t dim, int64_t heads);
  // `probs`, when given, receives the attention probabilities (computed
  // explicitly then; SDPA otherwise).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask,
                        torch::Tensor* probs = nullptr);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& mask) const;
  int64_t heads;
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(CLIPAttention);

struct CLIPMLPImpl : torch::nn::Module {
  CLIPMLPImpl(int64_t dim, int64_t inner, std::string act);
  torch::Tensor forward(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x) const;
  std::string act;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CLIPMLP);

struct CLIPEncoderLayerImpl : torch::nn::Module {
  explicit CLIPEncoderLayerImpl(const CLIPTextConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask,
                        torch::Tensor* probs = nullptr);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& mask) const;
  CLIPAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  CLIPMLP mlp{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

class CLIPTextModelImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelImpl(const CLIPTextConfig& config);
  // input_ids [B, T] (int64). `num_layers` < 0 runs every layer; otherwise only
  // the first num_layers (CLIP skip), with final_layer_norm applied to that output.
  // output_attentions fills CLIPTextOutput::attentions (text-encoder distillation).
  CLIPTextOutput forward(const torch::Tensor& input_ids, int64_t num_layers = -1,
                         bool output_attentions = false);
  const CLIPTextConfig& config() const { return config_; }
  // The float32 graph of forward (every layer): input_ids [batch, sequence] (int64)
  // -> last_hidden_state [batch, sequence, hidden] and pooler_output [batch, hidden].
  absl::StatusOr<onnx::Graph> ExportOnnx() const;

 private:
  CLIPTextConfig config_;
  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
  torch::nn::ModuleList layers{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(CLIPTextModel);

absl::StatusOr<CLIPTextModel> LoadCLIPTextModel(const std::string& dir, bool copy_weights = false);

}  // namespace sd
