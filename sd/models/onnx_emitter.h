#pragma once
// ONNX emission for the LibTorch modules our models are built from. Each model
// module has an ExportOnnx method that writes its own subgraph through this
// class, naming initializers by the state_dict key, so the file reads like the
// checkpoint. Everything is exported in float32 at opset 17 (sd/onnx/graph.h).
#include <torch/torch.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/onnx/graph.h"

namespace sd {

class OnnxEmitter {
 public:
  explicit OnnxEmitter(onnx::Graph& graph) : g_(graph) {}
  onnx::Graph& graph() { return g_; }

  // `t` as an initializer called `name`, viewed as `shape` (empty: its own). The
  // bytes are converted to float32 when the model is written, not now.
  std::string Weight(const std::string& name, const torch::Tensor& t,
                     std::vector<int64_t> shape = {});

  // LibTorch modules; `prefix` is the module's state_dict prefix.
  std::string Linear(const std::string& prefix, const torch::nn::LinearImpl& m,
                     const std::string& x);
  std::string Conv2d(const std::string& prefix, const torch::nn::Conv2dImpl& m,
                     const std::string& x);
  // Opset 17 has no GroupNormalization: InstanceNormalization over [B, G, C/G*H*W],
  // then the per-channel affine, which is what torch.onnx emits below opset 18.
  std::string GroupNorm(const std::string& prefix, const torch::nn::GroupNormImpl& m,
                        const std::string& x);
  std::string LayerNorm(const std::string& prefix, const torch::nn::LayerNormImpl& m,
                        const std::string& x);
  std::string Embedding(const std::string& prefix, const torch::nn::EmbeddingImpl& m,
                        const std::string& ids);

  std::string SiLU(const std::string& x);
  std::string Gelu(const std::string& x);  // erf form (opset 17 has no Gelu)
  std::string Activation(const std::string& name, const std::string& x);

  // Multi-head attention core: q [B, N, heads*d], k and v [B, M, heads*d] ->
  // [B, N, heads*d], softmax(q k^T / sqrt(d) + mask) v. `mask` (optional) is an
  // additive bias broadcast to [B, heads, N, M].
  std::string Attention(const std::string& q, const std::string& k, const std::string& v,
                        int64_t heads, int64_t dim_head, const std::string& mask = "");

  // Shape(x)[start:end] (int64 1-D).
  std::string Shape(const std::string& x, int64_t start, int64_t end);
  std::string Unsqueeze(const std::string& x, const std::vector<int64_t>& axes);
  std::string Reshape(const std::string& x, const std::vector<int64_t>& shape);
  std::string Transpose(const std::string& x, const std::vector<int64_t>& perm);
  std::string Add(const std::string& a, const std::string& b);
  std::string Mul(const std::string& a, const std::string& b);
  std::string Scale(const std::string& x, float s);

 private:
  onnx::Graph& g_;
};

// Wraps a graph builder's exceptions (LibTorch's TORCH_CHECK) into a Status.
absl::StatusOr<onnx::Graph> BuildOnnxGraph(const std::string& name,
                                           const std::function<void(onnx::Graph&)>& build);

}  // namespace sd
