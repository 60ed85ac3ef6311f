#include "sd/models/clip_text_model.h"

#include <cmath>
#include <filesystem>
#include <limits>

#include "absl/strings/str_cat.h"
#include "sd/io/safetensors.h"
#include "sd/models/layers.h"
#include "sd/models/onnx_emitter.h"
#include "sd/models/state_dict.h"
#include "sd/util/status_macros.h"

namespace sd {

absl::StatusOr<CLIPTextConfig> CLIPTextConfig::FromJson(const JsonConfig& c) {
  CLIPTextConfig t;
  ASSIGN_OR_RETURN(t.vocab_size, c.Int("vocab_size", 49408));
  ASSIGN_OR_RETURN(t.hidden_size, c.Int("hidden_size", 512));
  ASSIGN_OR_RETURN(t.intermediate_size, c.Int("intermediate_size", 2048));
  ASSIGN_OR_RETURN(t.num_hidden_layers, c.Int("num_hidden_layers", 12));
  ASSIGN_OR_RETURN(t.num_attention_heads, c.Int("num_attention_heads", 8));
  ASSIGN_OR_RETURN(t.max_position_embeddings, c.Int("max_position_embeddings", 77));
  ASSIGN_OR_RETURN(t.hidden_act, c.String("hidden_act", "quick_gelu"));
  ASSIGN_OR_RETURN(t.layer_norm_eps, c.Double("layer_norm_eps", 1e-5));
  ASSIGN_OR_RETURN(t.eos_token_id, c.Int("eos_token_id", 49407));
  ASSIGN_OR_RETURN(t.projection_dim, c.Int("projection_dim", 512));
  RETURN_IF_ERROR(c.Positive("vocab_size", t.vocab_size));
  RETURN_IF_ERROR(c.Positive("hidden_size", t.hidden_size));
  RETURN_IF_ERROR(c.Positive("intermediate_size", t.intermediate_size));
  RETURN_IF_ERROR(c.Positive("num_hidden_layers", t.num_hidden_layers));
  RETURN_IF_ERROR(c.Positive("max_position_embeddings", t.max_position_embeddings));
  RETURN_IF_ERROR(c.Positive("projection_dim", t.projection_dim));
  RETURN_IF_ERROR(
      c.Divides("num_attention_heads", {t.num_attention_heads}, "hidden_size", {t.hidden_size}));
  if (t.hidden_act != "quick_gelu" && t.hidden_act != "gelu") {
    return c.Error("hidden_act", "is not supported (quick_gelu or gelu)");
  }
  return t;
}

nlohmann::json CLIPTextConfig::ToJson() const {
  return {{"architectures", {"CLIPTextModel"}},
          {"model_type", "clip_text_model"},
          {"vocab_size", vocab_size},
          {"hidden_size", hidden_size},
          {"intermediate_size", intermediate_size},
          {"num_hidden_layers", num_hidden_layers},
          {"num_attention_heads", num_attention_heads},
          {"max_position_embeddings", max_position_embeddings},
          {"hidden_act", hidden_act},
          {"layer_norm_eps", layer_norm_eps},
          {"eos_token_id", eos_token_id},
          {"projection_dim", projection_dim}};
}

CLIPAttentionImpl::CLIPAttentionImpl(int64_t dim, int64_t heads) : heads(heads) {
  q_proj = register_module("q_proj", torch::nn::Linear(dim, dim));
  k_proj = register_module("k_proj", torch::nn::Linear(dim, dim));
  v_proj = register_module("v_proj", torch::nn::Linear(dim, dim));
  out_proj = register_module("out_proj", torch::nn::Linear(dim, dim));
}

torch::Tensor CLIPAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                         torch::Tensor* probs) {
  const int64_t b = x.size(0), t = x.size(1), d = x.size(2) / heads;
  auto q = q_proj(x).view({b, t, heads, d}).transpose(1, 2);
  auto k = k_proj(x).view({b, t, heads, d}).transpose(1, 2);
  auto v = v_proj(x).view({b, t, heads, d}).transpose(1, 2);
  torch::Tensor out;
  if (probs != nullptr) {
    *probs = (torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(d)) + mask)
                 .softmax(-1);
    out = torch::matmul(*probs, v);
  } else {
    out = Sdpa(sdpa, q, k, v, mask);
  }
  return out_proj(out.transpose(1, 2).reshape({b, t, heads * d}));
}

CLIPMLPImpl::CLIPMLPImpl(int64_t dim, int64_t inner, std::string a) : act(std::move(a)) {
  fc1 = register_module("fc1", torch::nn::Linear(dim, inner));
  fc2 = register_module("fc2", torch::nn::Linear(inner, dim));
}

torch::Tensor CLIPMLPImpl::forward(const torch::Tensor& x) { return fc2(Activation(act, fc1(x))); }

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextConfig& c) {
  auto ln = torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps);
  self_attn = register_module("self_attn", CLIPAttention(c.hidden_size, c.num_attention_heads));
  layer_norm1 = register_module("layer_norm1", torch::nn::LayerNorm(ln));
  mlp = register_module("mlp", CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act));
  layer_norm2 = register_module("layer_norm2", torch::nn::LayerNorm(ln));
}

torch::Tensor CLIPEncoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                            torch::Tensor* probs) {
  auto h = x + self_attn(layer_norm1(x), mask, probs);
  return h + mlp(layer_norm2(h));
}

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& c) : config_(c) {
  auto text_model = std::make_shared<torch::nn::Module>();
  auto embeddings = std::make_shared<torch::nn::Module>();
  token_embedding = embeddings->register_module("token_embedding",
                                                torch::nn::Embedding(c.vocab_size, c.hidden_size));
  position_embedding = embeddings->register_module(
      "position_embedding", torch::nn::Embedding(c.max_position_embeddings, c.hidden_size));
  text_model->register_module("embeddings", embeddings);
  auto encoder = std::make_shared<torch::nn::Module>();
  layers = encoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(CLIPEncoderLayer(c));
  text_model->register_module("encoder", encoder);
  final_layer_norm = text_model->register_module(
      "final_layer_norm",
      torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
  register_module("text_model", text_model);
}

CLIPTextOutput CLIPTextModelImpl::forward(const torch::Tensor& input_ids, int64_t num_layers,
                                          bool output_attentions) {
  const int64_t t = input_ids.size(1);
  auto dev = token_embedding->weight.device();
  auto ids = input_ids.to(dev);
  auto positions = torch::arange(t, torch::TensorOptions().dtype(torch::kLong).device(dev));
  auto h = token_embedding(ids) + position_embedding(positions).unsqueeze(0);
  // Causal mask as an additive bias so SDPA sees the same mask transformers builds.
  auto mask = torch::full({t, t}, -std::numeric_limits<float>::infinity(), h.options()).triu(1);
  CLIPTextOutput out;
  out.hidden_states.push_back(h);
  const int64_t n = num_layers < 0 ? static_cast<int64_t>(layers->size()) : num_layers;
  for (int64_t i = 0; i < n; ++i) {
    torch::Tensor probs;
    h = layers[i]->as<CLIPEncoderLayer>()->forward(h, mask, output_attentions ? &probs : nullptr);
    out.hidden_states.push_back(h);
    if (output_attentions) out.attentions.push_back(probs);
  }
  out.last_hidden_state = final_layer_norm(h);
  // transformers' legacy rule: with eos_token_id == 2 the EOS is the largest id.
  torch::Tensor eos_pos = config_.eos_token_id == 2
                              ? ids.argmax(-1)
                              : (ids == config_.eos_token_id).to(torch::kInt).argmax(-1);
  out.pooler_output =
      out.last_hidden_state.index({torch::arange(ids.size(0), ids.options()), eos_pos});
  return out;
}

std::string CLIPAttentionImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                          const std::string& x, const std::string& mask) const {
  onnx::Scope scope(e.graph(), prefix);
  const int64_t d = q_proj->weight.size(0) / heads;
  const auto out = e.Attention(e.Linear(prefix + ".q_proj", *q_proj, x),
                               e.Linear(prefix + ".k_proj", *k_proj, x),
                               e.Linear(prefix + ".v_proj", *v_proj, x), heads, d, mask);
  return e.Linear(prefix + ".out_proj", *out_proj, out);
}

std::string CLIPMLPImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                    const std::string& x) const {
  return e.Linear(prefix + ".fc2", *fc2, e.Activation(act, e.Linear(prefix + ".fc1", *fc1, x)));
}

std::string CLIPEncoderLayerImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                             const std::string& x, const std::string& mask) const {
  onnx::Scope scope(e.graph(), prefix);
  const auto h =
      e.Add(x, self_attn->ExportOnnx(e, prefix + ".self_attn",
                                     e.LayerNorm(prefix + ".layer_norm1", *layer_norm1, x), mask));
  return e.Add(h, mlp->ExportOnnx(e, prefix + ".mlp",
                                  e.LayerNorm(prefix + ".layer_norm2", *layer_norm2, h)));
}

absl::StatusOr<onnx::Graph> CLIPTextModelImpl::ExportOnnx() const {
  return BuildOnnxGraph("text_encoder", [this](onnx::Graph& g) {
    using onnx::Dim;
    OnnxEmitter e(g);
    g.AddInput(
        {"input_ids", onnx::ElemType::kInt64, {Dim::Symbolic("batch"), Dim::Symbolic("sequence")}});
    const std::string ids = "input_ids";
    const auto t = g.Op("Squeeze", {e.Shape(ids, 1, 2), g.Int64s({0})});
    const auto positions = g.Op("Range", {g.Int64(0), t, g.Int64(1)});
    auto h = e.Add(
        e.Embedding("text_model.embeddings.token_embedding", *token_embedding, ids),
        e.Embedding("text_model.embeddings.position_embedding", *position_embedding, positions));
    // The causal mask as forward builds it: -inf above the diagonal, 0 elsewhere.
    const auto tt =
        g.Op("Concat", {e.Shape(ids, 1, 2), e.Shape(ids, 1, 2)}, {{"axis", int64_t{0}}});
    const auto full = g.Op("Expand", {g.Float(-std::numeric_limits<float>::infinity()), tt});
    const auto mask = g.Op("Trilu", {full, g.Int64(1)}, {{"upper", int64_t{1}}});
    for (size_t i = 0; i < layers->size(); ++i) {
      h = (*layers)[i]->as<CLIPEncoderLayerImpl>()->ExportOnnx(
          e, absl::StrCat("text_model.encoder.layers.", i), h, mask);
    }
    const auto last = e.LayerNorm("text_model.final_layer_norm", *final_layer_norm, h);
    // transformers' legacy rule (see forward): with eos_token_id 2 the EOS is the
    // largest id, else the first eos_token_id. ArgMax takes the first maximum, as torch.
    const auto ids32 = g.Op("Cast", {ids}, {{"to", int64_t{6}}});
    const auto key = config_.eos_token_id == 2
                         ? ids32
                         : g.Op("Cast", {g.Op("Equal", {ids, g.Int64(config_.eos_token_id)})},
                                {{"to", int64_t{6}}});
    const auto eos = g.Op("ArgMax", {key}, {{"axis", int64_t{-1}}, {"keepdims", int64_t{1}}});
    const auto pooled = g.Op("GatherND", {last, eos}, {{"batch_dims", int64_t{1}}});
    g.Rename(last, "last_hidden_state");
    g.Rename(pooled, "pooler_output");
    g.AddOutput(
        {"last_hidden_state",
         onnx::ElemType::kFloat,
         {Dim::Symbolic("batch"), Dim::Symbolic("sequence"), Dim::Fixed(config_.hidden_size)}});
    g.AddOutput({"pooler_output",
                 onnx::ElemType::kFloat,
                 {Dim::Symbolic("batch"), Dim::Fixed(config_.hidden_size)}});
  });
}

absl::StatusOr<CLIPTextModel> LoadCLIPTextModel(const std::string& dir, bool copy_weights) {
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  ASSIGN_OR_RETURN(JsonConfig json, JsonConfig::Load(config_path));
  ASSIGN_OR_RETURN(CLIPTextConfig cfg, CLIPTextConfig::FromJson(json));
  CLIPTextModel model(cfg);
  LoadOptions opts;
  opts.ignorable = {"text_model.embeddings.position_ids"};
  // transformers >= 5 saves CLIPTextModel without the "text_model." prefix that
  // SD1.5 checkpoints carry; accept both.
  opts.prefix = "text_model.";
  opts.copy = copy_weights;
  RETURN_IF_ERROR(LoadComponentWeights(*model, dir, config_path, opts));
  model->eval();
  return model;
}

}  // namespace sd
