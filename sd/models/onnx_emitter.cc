#include "sd/models/onnx_emitter.h"

#include <cmath>
#include <exception>

#include "absl/strings/str_cat.h"
#include "sd/models/layers.h"

namespace sd {
namespace {

using onnx::Attribute;

// Our Conv2d/Linear may carry an INT8 kernel whose float weights are gone; the
// exporter writes float graphs only.
template <typename M>
void CheckNoHook(const std::string& prefix, const torch::nn::Module& m) {
  if (const auto* h = dynamic_cast<const M*>(&m); h != nullptr && h->hook) {
    TORCH_CHECK(false, "ONNX export: ", prefix,
                " runs an INT8 kernel; export the floating-point model instead");
  }
}

}  // namespace

std::string OnnxEmitter::Weight(const std::string& name, const torch::Tensor& t,
                                std::vector<int64_t> shape) {
  TORCH_CHECK(t.defined(), "ONNX export: ", name, " is undefined");
  onnx::Initializer init;
  init.name = name;
  init.type = onnx::ElemType::kFloat;
  init.shape = shape.empty() ? t.sizes().vec() : std::move(shape);
  TORCH_CHECK(init.numel() == t.numel(), "ONNX export: ", name, " has ", t.numel(),
              " elements, viewed as ", c10::IntArrayRef(init.shape));
  init.bytes = [t = t.detach()](std::string* out) {
    const auto c = t.to(torch::kCPU, torch::kFloat32).contiguous();
    out->append(static_cast<const char*>(c.data_ptr()), c.numel() * sizeof(float));
  };
  return g_.AddInitializer(std::move(init));
}

std::string OnnxEmitter::Linear(const std::string& prefix, const torch::nn::LinearImpl& m,
                                const std::string& x) {
  CheckNoHook<LinearImpl>(prefix, m);
  onnx::Scope scope(g_, prefix);
  // MatMul wants [in, out]; the transpose is taken when the bytes are written.
  onnx::Initializer w;
  w.name = prefix + ".weight_t";
  w.shape = {m.weight.size(1), m.weight.size(0)};
  w.bytes = [t = m.weight.detach()](std::string* out) {
    const auto c = t.to(torch::kCPU, torch::kFloat32).t().contiguous();
    out->append(static_cast<const char*>(c.data_ptr()), c.numel() * sizeof(float));
  };
  auto y = g_.Op("MatMul", {x, g_.AddInitializer(std::move(w))});
  if (m.bias.defined()) y = g_.Op("Add", {y, Weight(prefix + ".bias", m.bias)});
  return y;
}

std::string OnnxEmitter::Conv2d(const std::string& prefix, const torch::nn::Conv2dImpl& m,
                                const std::string& x) {
  CheckNoHook<Conv2dImpl>(prefix, m);
  const auto& o = m.options;
  TORCH_CHECK(std::holds_alternative<torch::ExpandingArray<2>>(o.padding()),
              "ONNX export: ", prefix, " has a symbolic padding (valid/same)");
  const auto& pad = std::get<torch::ExpandingArray<2>>(o.padding());
  TORCH_CHECK(std::holds_alternative<torch::enumtype::kZeros>(o.padding_mode()),
              "ONNX export: ", prefix, " pads other than with zeros");
  onnx::Scope scope(g_, prefix);
  std::vector<std::string> in{x, Weight(prefix + ".weight", m.weight)};
  if (m.bias.defined()) in.push_back(Weight(prefix + ".bias", m.bias));
  const auto k = m.weight.sizes();
  return g_.Op("Conv", in,
               {{"kernel_shape", std::vector<int64_t>{k[2], k[3]}},
                {"strides", std::vector<int64_t>{(*o.stride())[0], (*o.stride())[1]}},
                {"pads", std::vector<int64_t>{(*pad)[0], (*pad)[1], (*pad)[0], (*pad)[1]}},
                {"dilations", std::vector<int64_t>{(*o.dilation())[0], (*o.dilation())[1]}},
                {"group", o.groups()}});
}

std::string OnnxEmitter::GroupNorm(const std::string& prefix, const torch::nn::GroupNormImpl& m,
                                   const std::string& x) {
  const auto& o = m.options;
  const int64_t groups = o.num_groups(), c = o.num_channels();
  onnx::Scope scope(g_, prefix);
  const auto grouped = Reshape(x, {0, groups, -1});
  const auto normed = g_.Op("InstanceNormalization",
                            {grouped, g_.Floats(std::vector<float>(groups, 1.0f), {groups}),
                             g_.Floats(std::vector<float>(groups, 0.0f), {groups})},
                            {{"epsilon", static_cast<float>(o.eps())}});
  auto y = g_.Op("Reshape", {normed, g_.Op("Shape", {x})});
  if (o.affine()) {
    y = Mul(y, Weight(prefix + ".weight", m.weight, {c, 1, 1}));
    y = Add(y, Weight(prefix + ".bias", m.bias, {c, 1, 1}));
  }
  return y;
}

std::string OnnxEmitter::LayerNorm(const std::string& prefix, const torch::nn::LayerNormImpl& m,
                                   const std::string& x) {
  const auto& o = m.options;
  TORCH_CHECK(o.normalized_shape().size() == 1 && o.elementwise_affine(), "ONNX export: ", prefix,
              " must be an affine LayerNorm over the last axis");
  onnx::Scope scope(g_, prefix);
  return g_.Op("LayerNormalization",
               {x, Weight(prefix + ".weight", m.weight), Weight(prefix + ".bias", m.bias)},
               {{"axis", int64_t{-1}}, {"epsilon", static_cast<float>(o.eps())}});
}

std::string OnnxEmitter::Embedding(const std::string& prefix, const torch::nn::EmbeddingImpl& m,
                                   const std::string& ids) {
  onnx::Scope scope(g_, prefix);
  return g_.Op("Gather", {Weight(prefix + ".weight", m.weight), ids}, {{"axis", int64_t{0}}});
}

std::string OnnxEmitter::SiLU(const std::string& x) { return Mul(x, g_.Op("Sigmoid", {x})); }

std::string OnnxEmitter::Gelu(const std::string& x) {
  const auto erf = g_.Op("Erf", {Scale(x, static_cast<float>(1.0 / std::sqrt(2.0)))});
  return Mul(Scale(x, 0.5f), Add(erf, g_.Float(1.0f)));
}

std::string OnnxEmitter::Activation(const std::string& name, const std::string& x) {
  if (name == "silu" || name == "swish") return SiLU(x);
  if (name == "gelu") return Gelu(x);
  if (name == "quick_gelu") return Mul(x, g_.Op("Sigmoid", {Scale(x, 1.702f)}));
  if (name == "relu") return g_.Op("Relu", {x});
  TORCH_CHECK(false, "ONNX export: unsupported activation \"", name, "\"");
}

std::string OnnxEmitter::Attention(const std::string& q, const std::string& k, const std::string& v,
                                   int64_t heads, int64_t dim_head, const std::string& mask) {
  const auto split = [&](const std::string& t, const std::vector<int64_t>& perm) {
    return Transpose(Reshape(t, {0, 0, heads, dim_head}), perm);
  };
  const auto qh = split(q, {0, 2, 1, 3});  // [B, h, N, d]
  const auto kt = split(k, {0, 2, 3, 1});  // [B, h, d, M]
  const auto vh = split(v, {0, 2, 1, 3});  // [B, h, M, d]
  auto scores = Scale(g_.Op("MatMul", {qh, kt}), static_cast<float>(1.0 / std::sqrt(dim_head)));
  if (!mask.empty()) scores = Add(scores, mask);
  const auto probs = g_.Op("Softmax", {scores}, {{"axis", int64_t{-1}}});
  const auto out = Transpose(g_.Op("MatMul", {probs, vh}), {0, 2, 1, 3});
  return Reshape(out, {0, 0, heads * dim_head});
}

std::string OnnxEmitter::Shape(const std::string& x, int64_t start, int64_t end) {
  return g_.Op("Shape", {x}, {{"start", start}, {"end", end}});
}

std::string OnnxEmitter::Unsqueeze(const std::string& x, const std::vector<int64_t>& axes) {
  return g_.Op("Unsqueeze", {x, g_.Int64s(axes)});
}

std::string OnnxEmitter::Reshape(const std::string& x, const std::vector<int64_t>& shape) {
  return g_.Op("Reshape", {x, g_.Int64s(shape)});
}

std::string OnnxEmitter::Transpose(const std::string& x, const std::vector<int64_t>& perm) {
  return g_.Op("Transpose", {x}, {{"perm", perm}});
}

std::string OnnxEmitter::Add(const std::string& a, const std::string& b) {
  return g_.Op("Add", {a, b});
}

std::string OnnxEmitter::Mul(const std::string& a, const std::string& b) {
  return g_.Op("Mul", {a, b});
}

std::string OnnxEmitter::Scale(const std::string& x, float s) { return Mul(x, g_.Float(s)); }

absl::StatusOr<onnx::Graph> BuildOnnxGraph(const std::string& name,
                                           const std::function<void(onnx::Graph&)>& build) {
  onnx::Graph g(name);
  try {
    build(g);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(e.what());
  }
  return g;
}

}  // namespace sd
