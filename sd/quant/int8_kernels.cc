#include "sd/quant/int8_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace sd::quant {
namespace {

// The row loops below are the only element-wise passes on the INT8 hot path;
// target_clones gives them AVX-512/AVX2 bodies chosen at load time, since the
// build itself targets baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SD_VECTOR_CLONES
#endif

SD_VECTOR_CLONES float RowAbsMax(const float* x, int64_t n) {
  // Non-negative floats order like their bit patterns, and an integer max
  // reduction vectorizes without -ffast-math.
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    bits &= 0x7fffffffu;
    m = bits > m ? bits : m;
  }
  float f;
  std::memcpy(&f, &m, sizeof(f));
  return f;
}

SD_VECTOR_CLONES void RowToInt8(const float* __restrict x, int64_t n, float inv_scale,
                                int8_t* __restrict q) {
  // Round half to even, as torch.round (the Python reading of the format uses it).
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(std::min(std::max(x[i] * inv_scale, -127.f), 127.f));
    q[i] = static_cast<int8_t>(static_cast<int32_t>(v));
  }
}

SD_VECTOR_CLONES void RowToUInt8(const float* __restrict x, int64_t n, float inv_scale,
                                 float zero_point, uint8_t* __restrict q) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::min(std::max(std::nearbyint(x[i] * inv_scale) + zero_point, 0.f), 255.f);
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(v));
  }
}

SD_VECTOR_CLONES void RowDequant(const int32_t* acc, int64_t n, float row_scale,
                                 const float* col_scale, const float* bias, float* out) {
  if (bias != nullptr) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = static_cast<float>(acc[i]) * (row_scale * col_scale[i]) + bias[i];
  } else {
    for (int64_t i = 0; i < n; ++i)
      out[i] = static_cast<float>(acc[i]) * (row_scale * col_scale[i]);
  }
}

// Rows per parallel task: enough work per task that thread hand-off is noise.
int64_t Grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

}  // namespace

QuantizedWeight QuantizeWeightPerChannel(const torch::Tensor& w) {
  torch::NoGradGuard no_grad;
  auto wf = w.detach().to(torch::kFloat32).contiguous();
  auto amax = wf.reshape({wf.size(0), -1}).abs().amax(1);
  // An all-zero channel (a pruned-away filter) keeps scale 1 so q stays 0.
  auto scale = torch::where(amax > 0, amax / 127.0, torch::ones_like(amax));
  std::vector<int64_t> bshape(wf.dim(), 1);
  bshape[0] = wf.size(0);
  auto q = torch::round(wf / scale.view(bshape)).clamp(-127, 127).to(torch::kInt8);
  return {q.contiguous(), scale.contiguous()};
}

Affine AffineForRange(double lo, double hi) {
  lo = std::min(lo, 0.0);
  hi = std::max(hi, 0.0);
  Affine a;
  a.scale = hi > lo ? (hi - lo) / 255.0 : 1.0;
  a.zero_point = std::clamp<int64_t>(std::llround(-lo / a.scale), 0, 255);
  return a;
}

void QuantizeRowsSymmetric(const torch::Tensor& x, torch::Tensor& q, torch::Tensor& scale) {
  RECORD_FUNCTION("sd::quant::QuantizeRowsSymmetric", std::vector<c10::IValue>());
  const int64_t k = x.size(-1);
  auto xc = x.contiguous().view({-1, k});
  const int64_t m = xc.size(0);
  q = torch::empty({m, k}, x.options().dtype(torch::kInt8));
  scale = torch::empty({m}, x.options().dtype(torch::kFloat32));
  const float* px = xc.data_ptr<float>();
  auto* pq = q.data_ptr<int8_t>();
  auto* ps = scale.data_ptr<float>();
  at::parallel_for(0, m, Grain(k), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float amax = RowAbsMax(px + r * k, k);
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      ps[r] = s;
      RowToInt8(px + r * k, k, 1.f / s, pq + r * k);
    }
  });
}

torch::Tensor QuantizeAffine(const torch::Tensor& x, const Affine& a) {
  RECORD_FUNCTION("sd::quant::QuantizeAffine", std::vector<c10::IValue>());
  // oneDNN's int8 convolutions run on NHWC; a channels_last input costs no copy here.
  auto xc = x.dim() == 4 ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
  auto q = torch::empty_like(xc, xc.options().dtype(torch::kUInt8));
  const int64_t n = xc.numel();
  const float* px = xc.data_ptr<float>();
  auto* pq = q.data_ptr<uint8_t>();
  const auto inv = static_cast<float>(1.0 / a.scale);
  const auto zp = static_cast<float>(a.zero_point);
  constexpr int64_t kChunk = 16384;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t begin = c * kChunk, len = std::min(kChunk, n - begin);
      RowToUInt8(px + begin, len, inv, zp, pq + begin);
    }
  });
  return q;
}

Int8Linear::Int8Linear(QuantizedWeight w, torch::Tensor bias)
    : w_(std::move(w)),
      bias_(bias.defined() ? bias.detach().to(torch::kFloat32).contiguous() : bias) {
  w_t_ = w_.q.t();
}

torch::Tensor Int8Linear::Forward(
    const torch::Tensor& x, const std::function<torch::Tensor(const torch::Tensor&)>& /*unused*/) {
  const auto dtype = x.scalar_type();
  auto xf = dtype == torch::kFloat32 ? x : x.to(torch::kFloat32);
  torch::Tensor q, s;
  QuantizeRowsSymmetric(xf, q, s);
  auto acc = at::_int_mm(q, w_t_);
  const int64_t m = acc.size(0), n = acc.size(1);
  auto out = torch::empty({m, n}, xf.options());
  const auto* pa = acc.data_ptr<int32_t>();
  const auto* ps = s.data_ptr<float>();
  const auto* pw = w_.scale.data_ptr<float>();
  const float* pb = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
  auto* po = out.data_ptr<float>();
  RECORD_FUNCTION("sd::quant::Dequantize", std::vector<c10::IValue>());
  at::parallel_for(0, m, Grain(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) RowDequant(pa + r * n, n, ps[r], pw, pb, po + r * n);
  });
  auto shape = x.sizes().vec();
  shape.back() = n;
  out = out.view(shape);
  return dtype == torch::kFloat32 ? out : out.to(dtype);
}

Int8Conv2d::Int8Conv2d(QuantizedWeight w, torch::Tensor bias,
                       const torch::nn::detail::ConvNdOptions<2>& options, Affine input)
    : w_(std::move(w)),
      bias_(bias.defined() ? bias.detach().to(torch::kFloat32).contiguous() : bias),
      input_(input) {
  const auto* pad = std::get_if<torch::ExpandingArray<2>>(&options.padding());
  TORCH_CHECK(pad != nullptr, "Int8Conv2d: only explicit integer padding is supported");
  stride_ = {options.stride()->at(0), options.stride()->at(1)};
  padding_ = {(*pad)->at(0), (*pad)->at(1)};
  dilation_ = {options.dilation()->at(0), options.dilation()->at(1)};
  groups_ = options.groups();
  zero_points_ = torch::zeros({w_.scale.size(0)}, torch::kLong);
  static const auto prepack =
      c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qconv_prepack", "");
  torch::jit::Stack st{w_.q.contiguous(at::MemoryFormat::ChannelsLast),
                       w_.scale,
                       input_.scale,
                       input_.zero_point,
                       stride_,
                       padding_,
                       dilation_,
                       groups_,
                       c10::IValue()};
  prepack.callBoxed(&st);
  packed_ = st.at(0).toTensor();
}

torch::Tensor Int8Conv2d::Forward(
    const torch::Tensor& x, const std::function<torch::Tensor(const torch::Tensor&)>& /*unused*/) {
  static const auto conv =
      c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qconv2d_pointwise", "");
  const auto dtype = x.scalar_type();
  auto qx = QuantizeAffine(dtype == torch::kFloat32 ? x : x.to(torch::kFloat32), input_);
  torch::jit::Stack st{qx,
                       input_.scale,
                       input_.zero_point,
                       packed_,
                       w_.scale,
                       zero_points_,
                       bias_.defined() ? c10::IValue(bias_) : c10::IValue(),
                       stride_,
                       padding_,
                       dilation_,
                       groups_,
                       1.0,
                       static_cast<int64_t>(0),
                       c10::IValue(c10::ScalarType::Float),
                       std::string("none"),
                       c10::List<std::optional<c10::Scalar>>(),
                       c10::IValue(std::string(""))};
  conv.callBoxed(&st);
  auto out = st.at(0).toTensor();
  return dtype == torch::kFloat32 ? out : out.to(dtype);
}

}  // namespace sd::quant
