#include "sd/models/layers.h"

#include "absl/strings/str_cat.h"
#include "sd/models/onnx_emitter.h"

#include <algorithm>
#include <cmath>

namespace sd {
namespace F = torch::nn::functional;

void ToChannelsLast(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) {
    if (p.dim() == 4) p.set_data(p.data().contiguous(at::MemoryFormat::ChannelsLast));
  }
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  if (!hook) return torch::nn::Conv2dImpl::forward(x);
  return hook->Forward(
      x, [this](const torch::Tensor& in) { return torch::nn::Conv2dImpl::forward(in); });
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (!hook) return torch::nn::LinearImpl::forward(x);
  return hook->Forward(
      x, [this](const torch::Tensor& in) { return torch::nn::LinearImpl::forward(in); });
}

torch::Tensor Activation(const std::string& name, const torch::Tensor& x) {
  if (name == "silu" || name == "swish") return torch::silu(x);
  if (name == "gelu") return torch::gelu(x);
  if (name == "quick_gelu") return x * torch::sigmoid(1.702 * x);
  if (name == "relu") return torch::relu(x);
  TORCH_CHECK(false, "unsupported activation \"", name, "\"");
}

namespace {

// exp(-log(10000) * i / (half - shift)), float32 as diffusers computes it.
torch::Tensor TimestepFrequencies(int64_t half, double downscale_freq_shift,
                                  const torch::Device& device) {
  auto exponent =
      -std::log(10000.0) *
      torch::arange(0, half, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);
  return torch::exp(exponent);
}

}  // namespace

torch::Tensor TimestepEmbedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                double downscale_freq_shift) {
  const int64_t half = dim / 2;
  auto emb = timesteps.unsqueeze(1).to(torch::kFloat32) *
             TimestepFrequencies(half, downscale_freq_shift, timesteps.device()).unsqueeze(0);
  emb = torch::cat({torch::sin(emb), torch::cos(emb)}, -1);
  if (flip_sin_to_cos) emb = torch::cat({emb.slice(1, half), emb.slice(1, 0, half)}, -1);
  if (dim % 2 == 1) emb = F::pad(emb, F::PadFuncOptions({0, 1, 0, 0}));
  return emb;
}

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in, int64_t out, int64_t temb_channels, int64_t groups,
                                     double eps, double output_scale_factor)
    : output_scale_factor(output_scale_factor) {
  norm1 = register_module("norm1",
                          torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, in).eps(eps)));
  conv1 = register_module("conv1", Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1)));
  if (temb_channels > 0)
    time_emb_proj = register_module("time_emb_proj", Linear(temb_channels, out));
  norm2 = register_module("norm2",
                          torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, out).eps(eps)));
  conv2 = register_module("conv2", Conv2d(torch::nn::Conv2dOptions(out, out, 3).padding(1)));
  if (in != out)
    conv_shortcut = register_module("conv_shortcut", Conv2d(torch::nn::Conv2dOptions(in, out, 1)));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  auto h = conv1(torch::silu(norm1(x)));
  if (time_emb_proj && temb.defined()) {
    h = h + time_emb_proj(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1);
  }
  h = conv2(torch::silu(norm2(h)));
  auto shortcut = conv_shortcut ? conv_shortcut(x) : x;
  auto out = shortcut + h;
  if (output_scale_factor != 1.0) out = out / output_scale_factor;
  return out;
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t out, int64_t padding)
    : padding(padding) {
  conv = register_module(
      "conv", Conv2d(torch::nn::Conv2dOptions(channels, out, 3).stride(2).padding(padding)));
}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) {
  // With padding 0 (the VAE) diffusers pads right/bottom only, so even sizes halve exactly.
  if (padding == 0) return conv(F::pad(x, F::PadFuncOptions({0, 1, 0, 1})));
  return conv(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, int64_t out) {
  conv = register_module("conv", Conv2d(torch::nn::Conv2dOptions(channels, out, 3).padding(1)));
}

torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x, c10::IntArrayRef size) {
  auto dtype = x.scalar_type();
  auto h = dtype == torch::kBFloat16 ? x.to(torch::kFloat32) : x;
  std::vector<int64_t> out_size =
      size.empty() ? std::vector<int64_t>{x.size(2) * 2, x.size(3) * 2} : size.vec();
  h = F::interpolate(h, F::InterpolateFuncOptions().size(out_size).mode(torch::kNearest));
  if (dtype == torch::kBFloat16) h = h.to(dtype);
  return conv(h);
}

absl::StatusOr<SdpaBackend> ParseSdpaBackend(const std::string& name) {
  for (auto b : {SdpaBackend::kAuto, SdpaBackend::kMath, SdpaBackend::kFlash,
                 SdpaBackend::kEfficient, SdpaBackend::kCudnn}) {
    if (name == SdpaBackendName(b)) return b;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "attention backend \"", name, "\" is not one of auto, math, flash, efficient, cudnn"));
}

const char* SdpaBackendName(SdpaBackend b) {
  switch (b) {
    case SdpaBackend::kAuto:
      return "auto";
    case SdpaBackend::kMath:
      return "math";
    case SdpaBackend::kFlash:
      return "flash";
    case SdpaBackend::kEfficient:
      return "efficient";
    case SdpaBackend::kCudnn:
      return "cudnn";
  }
  return "?";
}

absl::Status CheckSdpaBackend(SdpaBackend b, const torch::Device& device) {
  if ((b == SdpaBackend::kEfficient || b == SdpaBackend::kCudnn) && !device.is_cuda())
    return absl::InvalidArgumentError(absl::StrCat("attention backend ", SdpaBackendName(b),
                                                   " runs on CUDA only; this run is on ",
                                                   device.str(), " (use auto, math or flash)"));
  return absl::OkStatus();
}

torch::Tensor Sdpa(SdpaBackend backend, const torch::Tensor& q, const torch::Tensor& k,
                   const torch::Tensor& v, const torch::Tensor& mask) {
  if (backend != SdpaBackend::kAuto && q.dim() == 3) {
    // The fused kernels take [B, heads, N, d] only (slicing hands [slices, N, d]).
    return Sdpa(backend, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask).squeeze(0);
  }
  const std::optional<torch::Tensor> m = mask.defined() ? std::optional(mask) : std::nullopt;
  switch (backend) {
    case SdpaBackend::kAuto:
      break;
    case SdpaBackend::kMath:
      return std::get<0>(at::_scaled_dot_product_attention_math(q, k, v, m));
    case SdpaBackend::kFlash:
      if (!q.is_cuda())
        return std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, m));
      TORCH_CHECK(!m, "the CUDA flash attention kernel takes no attention mask");
      return std::get<0>(at::_scaled_dot_product_flash_attention(q, k, v));
    case SdpaBackend::kEfficient:
      return std::get<0>(at::_scaled_dot_product_efficient_attention(q, k, v, m, false));
    case SdpaBackend::kCudnn:
      return std::get<0>(at::_scaled_dot_product_cudnn_attention(q, k, v, m, false));
  }
  return at::scaled_dot_product_attention(q, k, v, m);
}

void SetSdpaBackend(torch::nn::Module& module, SdpaBackend backend) {
  for (auto& m : module.modules()) {
    if (auto* u = dynamic_cast<UsesSdpa*>(m.get())) u->sdpa = backend;
  }
}

AttentionImpl::AttentionImpl(const AttentionOptions& o, std::shared_ptr<AttentionRecorder> rec,
                             std::string n)
    : opt(o), recorder(std::move(rec)), name(std::move(n)) {
  const int64_t inner = o.heads * o.dim_head;
  const int64_t kv_dim = o.cross_attention_dim > 0 ? o.cross_attention_dim : o.query_dim;
  if (o.norm_groups > 0) {
    group_norm = register_module(
        "group_norm", torch::nn::GroupNorm(
                          torch::nn::GroupNormOptions(o.norm_groups, o.query_dim).eps(o.norm_eps)));
  }
  to_q = register_module("to_q",
                         Linear(torch::nn::LinearOptions(o.query_dim, inner).bias(o.qkv_bias)));
  to_k = register_module("to_k", Linear(torch::nn::LinearOptions(kv_dim, inner).bias(o.qkv_bias)));
  to_v = register_module("to_v", Linear(torch::nn::LinearOptions(kv_dim, inner).bias(o.qkv_bias)));
  to_out = register_module("to_out", torch::nn::ModuleList());
  to_out->push_back(Linear(torch::nn::LinearOptions(inner, o.query_dim).bias(o.out_bias)));
}

void AttentionImpl::fuse_projections() {
  // INT8 projections have their own fused form (fused_hook); their float weights may be gone.
  if (to_q->hook || to_k->hook || to_v->hook) return;
  torch::NoGradGuard no_grad;
  const bool self_attn = opt.cross_attention_dim == 0;
  std::vector<torch::Tensor> w, bias;
  if (self_attn) w.push_back(to_q->weight);
  w.push_back(to_k->weight);
  w.push_back(to_v->weight);
  fused_weight = torch::cat(w, 0);
  // The separate weights become views of the fused matrix: one copy in memory.
  std::vector<Linear> parts;
  if (self_attn) parts.push_back(to_q);
  parts.push_back(to_k);
  parts.push_back(to_v);
  int64_t row = 0;
  for (auto& lin : parts) {
    const int64_t n = lin->weight.size(0);
    lin->weight.set_data(fused_weight.slice(0, row, row + n));
    row += n;
  }
  if (opt.qkv_bias) {
    for (auto& lin : parts) bias.push_back(lin->bias);
    fused_bias = torch::cat(bias, 0);
    row = 0;
    for (auto& lin : parts) {
      const int64_t n = lin->bias.size(0);
      lin->bias.set_data(fused_bias.slice(0, row, row + n));
      row += n;
    }
  }
}

void AttentionImpl::unfuse_projections() {
  fused_weight = torch::Tensor();
  fused_bias = torch::Tensor();
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const auto& kv = context.defined() ? context : x;
  const int64_t b = x.size(0), h = opt.heads, d = opt.dim_head;
  torch::Tensor q, k, v;
  if (fused_hook && opt.cross_attention_dim == 0) {
    auto qkv = fused_hook->Forward(x, nullptr).view({b, -1, 3, h, d});
    q = qkv.select(2, 0).transpose(1, 2);
    k = qkv.select(2, 1).transpose(1, 2);
    v = qkv.select(2, 2).transpose(1, 2);
  } else if (fused_weight.defined() && !is_training()) {
    if (opt.cross_attention_dim == 0) {
      auto qkv = torch::nn::functional::linear(x, fused_weight, fused_bias).view({b, -1, 3, h, d});
      q = qkv.select(2, 0).transpose(1, 2);
      k = qkv.select(2, 1).transpose(1, 2);
      v = qkv.select(2, 2).transpose(1, 2);
    } else {
      q = to_q(x).view({b, -1, h, d}).transpose(1, 2);
      auto kvp = torch::nn::functional::linear(kv, fused_weight, fused_bias).view({b, -1, 2, h, d});
      k = kvp.select(2, 0).transpose(1, 2);
      v = kvp.select(2, 1).transpose(1, 2);
    }
  } else {
    q = to_q(x).view({b, -1, h, d}).transpose(1, 2);
    k = to_k(kv).view({b, -1, h, d}).transpose(1, 2);
    v = to_v(kv).view({b, -1, h, d}).transpose(1, 2);
  }
  torch::Tensor out;
  if (recorder && recorder->enabled) {
    // Explicit softmax so the probabilities can be handed out; SDPA never forms them.
    auto scores = torch::matmul(q.to(torch::kFloat32), k.to(torch::kFloat32).transpose(-1, -2)) /
                  std::sqrt(static_cast<double>(d));
    auto probs = torch::softmax(scores, -1);
    recorder->names.push_back(name);
    recorder->maps.push_back(probs);
    out = torch::matmul(probs.to(v.scalar_type()), v);
  } else {
    const bool upcast = opt.upcast && q.scalar_type() != torch::kFloat32;
    const auto sdpa = [upcast, backend = this->sdpa](const torch::Tensor& qs,
                                                     const torch::Tensor& ks,
                                                     const torch::Tensor& vs) {
      if (!upcast) return Sdpa(backend, qs, ks, vs);
      return Sdpa(backend, qs.to(torch::kFloat32), ks.to(torch::kFloat32), vs.to(torch::kFloat32))
          .to(qs.scalar_type());
    };
    const int64_t slice = slice_size < 0 ? std::max<int64_t>(1, h / 2) : slice_size;
    if (slice > 0 && slice < b * h) {
      const auto q3 = q.reshape({b * h, q.size(2), d}), k3 = k.reshape({b * h, k.size(2), d}),
                 v3 = v.reshape({b * h, v.size(2), d});
      out = torch::empty_like(q3);
      for (int64_t i = 0; i < b * h; i += slice) {
        const int64_t e = std::min(b * h, i + slice);
        out.slice(0, i, e).copy_(sdpa(q3.slice(0, i, e), k3.slice(0, i, e), v3.slice(0, i, e)));
      }
      out = out.view({b, h, -1, d});
    } else {
      out = sdpa(q, k, v);
    }
  }
  out = out.transpose(1, 2).reshape({b, -1, h * d});
  return to_out[0]->as<Linear>()->forward(out);
}

torch::Tensor AttentionImpl::forward_spatial(const torch::Tensor& x) {
  const int64_t b = x.size(0), c = x.size(1), hh = x.size(2), ww = x.size(3);
  auto h = group_norm ? group_norm(x) : x;
  h = h.reshape({b, c, hh * ww}).transpose(1, 2);
  h = forward(h);
  h = h.transpose(1, 2).reshape({b, c, hh, ww});
  return h + x;
}

GEGLUImpl::GEGLUImpl(int64_t in, int64_t out) {
  proj = register_module("proj", Linear(in, out * 2));
}

torch::Tensor GEGLUImpl::forward(const torch::Tensor& x) {
  auto chunks = proj(x).chunk(2, -1);
  return chunks[0] * torch::gelu(chunks[1]);
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t mult) {
  net = register_module("net", torch::nn::ModuleList());
  geglu = GEGLU(dim, dim * mult);
  out = Linear(dim * mult, dim);
  net->push_back(geglu);
  net->push_back(torch::nn::Dropout(0.0));
  net->push_back(out);
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) { return out(geglu(x)); }

BasicTransformerBlockImpl::BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head,
                                                     int64_t cross_dim, bool upcast,
                                                     const std::shared_ptr<AttentionRecorder>& rec,
                                                     const std::string& name) {
  norm1 =
      register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-5)));
  AttentionOptions a;
  a.query_dim = dim;
  a.heads = heads;
  a.dim_head = dim_head;
  a.upcast = upcast;
  attn1 = register_module("attn1", Attention(a, rec, name + ".attn1"));
  norm2 =
      register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-5)));
  a.cross_attention_dim = cross_dim;
  attn2 = register_module("attn2", Attention(a, rec, name + ".attn2"));
  norm3 =
      register_module("norm3", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-5)));
  ff = register_module("ff", FeedForward(dim));
}

torch::Tensor BasicTransformerBlockImpl::forward(torch::Tensor x, const torch::Tensor& context) {
  std::optional<TokenMerge> m;
  if (tome) m = tome->ForBlock(x);
  if (!m) {
    x = attn1(norm1(x)) + x;
    x = attn2(norm2(x), context) + x;
    return ff(norm3(x)) + x;
  }
  // tomesd's patched block: merge after each norm, unmerge before each residual.
  const ToMeOptions& o = tome->options;
  const auto merge = [&](bool on, const torch::Tensor& t) { return on ? m->Merge(t) : t; };
  const auto unmerge = [&](bool on, const torch::Tensor& t) { return on ? m->Unmerge(t) : t; };
  x = unmerge(o.merge_attn, attn1(merge(o.merge_attn, norm1(x)))) + x;
  x = unmerge(o.merge_crossattn, attn2(merge(o.merge_crossattn, norm2(x)), context)) + x;
  return unmerge(o.merge_mlp, ff(merge(o.merge_mlp, norm3(x)))) + x;
}

Transformer2DModelImpl::Transformer2DModelImpl(const Transformer2DOptions& o,
                                               const std::shared_ptr<AttentionRecorder>& rec,
                                               const std::string& name)
    : opt(o) {
  const int64_t c = o.channels;
  norm = register_module(
      "norm", torch::nn::GroupNorm(torch::nn::GroupNormOptions(o.norm_groups, c).eps(1e-6)));
  if (o.use_linear_projection) {
    proj_in = torch::nn::AnyModule(register_module("proj_in", Linear(c, c)));
  } else {
    proj_in =
        torch::nn::AnyModule(register_module("proj_in", Conv2d(torch::nn::Conv2dOptions(c, c, 1))));
  }
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.layers; ++i) {
    transformer_blocks->push_back(
        BasicTransformerBlock(c, o.heads, c / o.heads, o.cross_attention_dim, o.upcast_attention,
                              rec, name + ".transformer_blocks." + std::to_string(i)));
  }
  if (o.use_linear_projection) {
    proj_out = torch::nn::AnyModule(register_module("proj_out", Linear(c, c)));
  } else {
    proj_out = torch::nn::AnyModule(
        register_module("proj_out", Conv2d(torch::nn::Conv2dOptions(c, c, 1))));
  }
}

torch::Tensor Transformer2DModelImpl::forward(const torch::Tensor& x,
                                              const torch::Tensor& context) {
  const int64_t b = x.size(0), c = x.size(1), hh = x.size(2), ww = x.size(3);
  auto h = norm(x);
  if (!opt.use_linear_projection) h = proj_in.forward(h);
  h = h.permute({0, 2, 3, 1}).reshape({b, hh * ww, c});
  if (opt.use_linear_projection) h = proj_in.forward(h);
  for (const auto& blk : *transformer_blocks)
    h = blk->as<BasicTransformerBlock>()->forward(h, context);
  if (opt.use_linear_projection) h = proj_out.forward(h);
  h = h.reshape({b, hh, ww, c}).permute({0, 3, 1, 2});
  // With channels_last input the permutes above are views, and the conv takes the
  // NHWC-strided tensor as is; forcing NCHW here would add a copy.
  if (!opt.use_linear_projection) h = proj_out.forward(h);
  return h + x;
}

// ---- ONNX export: each block as its forward above, on OnnxEmitter. ----

std::string TimestepEmbeddingOnnx(OnnxEmitter& e, const std::string& timesteps, int64_t dim,
                                  bool flip_sin_to_cos, double downscale_freq_shift) {
  auto& g = e.graph();
  const int64_t half = dim / 2;
  const auto freqs =
      e.Weight("time_proj.frequencies",
               TimestepFrequencies(half, downscale_freq_shift, torch::kCPU), {1, half});
  const auto args = e.Mul(e.Unsqueeze(timesteps, {1}), freqs);
  const auto sin = g.Op("Sin", {args}), cos = g.Op("Cos", {args});
  auto emb = g.Op("Concat", flip_sin_to_cos ? std::vector{cos, sin} : std::vector{sin, cos},
                  {{"axis", int64_t{-1}}});
  if (dim % 2 == 1) emb = g.Op("Pad", {emb, g.Int64s({0, 0, 0, 1})});
  return emb;
}

std::string ResnetBlock2DImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                          const std::string& x, const std::string& temb) const {
  onnx::Scope scope(e.graph(), prefix);
  auto h = e.Conv2d(prefix + ".conv1", *conv1, e.SiLU(e.GroupNorm(prefix + ".norm1", *norm1, x)));
  if (time_emb_proj && !temb.empty()) {
    h = e.Add(
        h, e.Unsqueeze(e.Linear(prefix + ".time_emb_proj", *time_emb_proj, e.SiLU(temb)), {2, 3}));
  }
  h = e.Conv2d(prefix + ".conv2", *conv2, e.SiLU(e.GroupNorm(prefix + ".norm2", *norm2, h)));
  const auto shortcut = conv_shortcut ? e.Conv2d(prefix + ".conv_shortcut", *conv_shortcut, x) : x;
  auto out = e.Add(shortcut, h);
  if (output_scale_factor != 1.0) out = e.Scale(out, static_cast<float>(1.0 / output_scale_factor));
  return out;
}

std::string Downsample2DImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                         const std::string& x) const {
  auto& g = e.graph();
  const auto in = padding == 0 ? g.Op("Pad", {x, g.Int64s({0, 0, 0, 0, 0, 0, 1, 1})}) : x;
  return e.Conv2d(prefix + ".conv", *conv, in);
}

std::string Upsample2DImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                       const std::string& x, const std::string& size_like) const {
  auto& g = e.graph();
  onnx::Scope scope(g, prefix);
  // torch's "nearest" is ONNX's asymmetric/floor.
  const std::vector<onnx::Attribute> attrs = {
      {"mode", std::string("nearest")},
      {"coordinate_transformation_mode", std::string("asymmetric")},
      {"nearest_mode", std::string("floor")}};
  std::string up;
  if (size_like.empty()) {
    up = g.Op("Resize", {x, "", g.Floats({1, 1, 2, 2}, {4})}, attrs);
  } else {
    const auto sizes =
        g.Op("Concat", {e.Shape(x, 0, 2), e.Shape(size_like, 2, 4)}, {{"axis", int64_t{0}}});
    up = g.Op("Resize", {x, "", "", sizes}, attrs);
  }
  return e.Conv2d(prefix + ".conv", *conv, up);
}

std::string AttentionImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                      const std::string& x, const std::string& context) const {
  TORCH_CHECK(!fused_hook, "ONNX export: ", prefix,
              " runs an INT8 kernel; export the floating-point model instead");
  onnx::Scope scope(e.graph(), prefix);
  const auto& kv = context.empty() ? x : context;
  const auto q = e.Linear(prefix + ".to_q", *to_q, x);
  const auto k = e.Linear(prefix + ".to_k", *to_k, kv);
  const auto v = e.Linear(prefix + ".to_v", *to_v, kv);
  const auto out = e.Attention(q, k, v, opt.heads, opt.dim_head);
  return e.Linear(prefix + ".to_out.0", *(*to_out)[0]->as<LinearImpl>(), out);
}

std::string AttentionImpl::ExportOnnxSpatial(OnnxEmitter& e, const std::string& prefix,
                                             const std::string& x) const {
  const auto h = group_norm ? e.GroupNorm(prefix + ".group_norm", *group_norm, x) : x;
  const auto tokens = e.Transpose(e.Reshape(h, {0, opt.query_dim, -1}), {0, 2, 1});
  const auto out = e.Transpose(ExportOnnx(e, prefix, tokens), {0, 2, 1});
  return e.Add(e.graph().Op("Reshape", {out, e.Shape(x, 0, 4)}), x);
}

std::string GEGLUImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                  const std::string& x) const {
  auto& g = e.graph();
  const int64_t inner = proj->weight.size(0) / 2;
  const auto parts = g.Op("Split", {e.Linear(prefix + ".proj", *proj, x), g.Int64s({inner, inner})},
                          {{"axis", int64_t{-1}}}, 2);
  return e.Mul(parts[0], e.Gelu(parts[1]));
}

std::string FeedForwardImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                        const std::string& x) const {
  onnx::Scope scope(e.graph(), prefix);
  return e.Linear(prefix + ".net.2", *out, geglu->ExportOnnx(e, prefix + ".net.0", x));
}

std::string BasicTransformerBlockImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                                  const std::string& x_in,
                                                  const std::string& context) const {
  onnx::Scope scope(e.graph(), prefix);
  auto x = x_in;
  x = e.Add(attn1->ExportOnnx(e, prefix + ".attn1", e.LayerNorm(prefix + ".norm1", *norm1, x)), x);
  x = e.Add(
      attn2->ExportOnnx(e, prefix + ".attn2", e.LayerNorm(prefix + ".norm2", *norm2, x), context),
      x);
  return e.Add(ff->ExportOnnx(e, prefix + ".ff", e.LayerNorm(prefix + ".norm3", *norm3, x)), x);
}

std::string Transformer2DModelImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                               const std::string& x,
                                               const std::string& context) const {
  onnx::Scope scope(e.graph(), prefix);
  const int64_t c = opt.channels;
  const auto proj = [&](const torch::nn::AnyModule& m, const std::string& name,
                        const std::string& in) {
    if (opt.use_linear_projection) return e.Linear(prefix + name, *m.ptr()->as<LinearImpl>(), in);
    return e.Conv2d(prefix + name, *m.ptr()->as<Conv2dImpl>(), in);
  };
  auto h = e.GroupNorm(prefix + ".norm", *norm, x);
  if (!opt.use_linear_projection) h = proj(proj_in, ".proj_in", h);
  h = e.Reshape(e.Transpose(h, {0, 2, 3, 1}), {0, -1, c});
  if (opt.use_linear_projection) h = proj(proj_in, ".proj_in", h);
  for (size_t i = 0; i < transformer_blocks->size(); ++i) {
    h = (*transformer_blocks)[i]->as<BasicTransformerBlockImpl>()->ExportOnnx(
        e, absl::StrCat(prefix, ".transformer_blocks.", i), h, context);
  }
  if (opt.use_linear_projection) h = proj(proj_out, ".proj_out", h);
  h = e.graph().Op("Reshape", {e.Transpose(h, {0, 2, 1}), e.Shape(x, 0, 4)});
  if (!opt.use_linear_projection) h = proj(proj_out, ".proj_out", h);
  return e.Add(h, x);
}

}  // namespace sd
