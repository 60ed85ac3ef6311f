// The INT8 kernels against float arithmetic on the same quantized numbers: what
// the kernels compute must be exactly "dequantize, then the float op", up to
// float summation order, so any error left is the quantization's own.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sd/quant/int8_kernels.h"

namespace sd::quant {
namespace {

torch::Tensor Dequantized(const QuantizedWeight& w) {
  std::vector<int64_t> shape(w.q.dim(), 1);
  shape[0] = w.q.size(0);
  return w.q.to(torch::kFloat32) * w.scale.view(shape);
}

TEST(Int8Kernels, WeightsAreSymmetricPerChannelAndAZeroChannelStaysZero) {
  auto w = torch::randn({6, 5, 3, 3});
  w[2].zero_();
  auto q = QuantizeWeightPerChannel(w);
  EXPECT_EQ(q.q.scalar_type(), torch::kInt8);
  EXPECT_EQ(q.q.abs().amax({1, 2, 3}).index({torch::tensor({0, 1, 3, 4, 5})}).min().item<int>(),
            127);
  EXPECT_EQ(q.q[2].abs().max().item<int>(), 0);
  auto err = (Dequantized(q) - w).abs();
  EXPECT_TRUE((err <= q.scale.view({6, 1, 1, 1}) / 2 + 1e-7).all().item<bool>());
}

TEST(Int8Kernels, AffineRangeAlwaysRepresentsZeroExactly) {
  for (auto [lo, hi] : std::vector<std::pair<double, double>>{{-0.3, 5.0}, {0.5, 2.0}, {-4, -1}}) {
    auto a = AffineForRange(lo, hi);
    EXPECT_GE(a.zero_point, 0);
    EXPECT_LE(a.zero_point, 255);
    auto q = QuantizeAffine(torch::zeros({3}), a);
    EXPECT_EQ(q[0].item<int>(), a.zero_point);
  }
}

TEST(Int8Kernels, LinearIsPerTokenQuantizedMatmulOfTheQuantizedWeights) {
  torch::manual_seed(0);
  auto x = torch::randn({2, 37, 48}) * torch::linspace(0.1, 10, 37).view({1, 37, 1});
  auto w = torch::randn({24, 48}) * 0.1;
  auto b = torch::randn({24});
  auto qw = QuantizeWeightPerChannel(w);
  Int8Linear lin(qw, b);
  auto y = lin.Forward(x, nullptr);
  // Reference: each token scaled by its own max|x| / 127, rounded, then float matmul.
  auto s = x.abs().amax(-1, true) / 127;
  auto xq = torch::round(x / s).clamp(-127, 127) * s;
  auto ref = torch::nn::functional::linear(xq, Dequantized(qw), b);
  EXPECT_EQ(y.sizes(), ref.sizes());
  EXPECT_LT((y - ref).abs().max().item<double>(), 1e-3 * ref.abs().max().item<double>());
  // And it is a fair approximation of the float layer.
  auto exact = torch::nn::functional::linear(x, w, b);
  EXPECT_LT(((y - exact).norm() / exact.norm()).item<double>(), 0.02);
}

TEST(Int8Kernels, ConvIsStaticallyQuantizedConvOfTheQuantizedWeights) {
  torch::manual_seed(1);
  for (auto [stride, pad, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 1, 3}, {2, 1, 3}, {2, 0, 3}, {1, 0, 1}}) {
    // A range far from one-sided puts the zero point mid-scale, where padding with
    // the zero point rather than with 0 would show at every border pixel.
    auto x = torch::randn({2, 16, 9, 10}) * 2 + 0.5;
    auto w = torch::randn({24, 16, k, k}) * 0.1;
    auto b = torch::randn({24});
    auto qw = QuantizeWeightPerChannel(w);
    auto a = AffineForRange(x.min().item<double>(), x.max().item<double>() * 0.8);  // some clipping
    torch::nn::Conv2dImpl layer(torch::nn::Conv2dOptions(16, 24, k).stride(stride).padding(pad));
    Int8Conv2d conv(qw, b, layer.options, a);
    auto y = conv.Forward(x, nullptr);
    auto xq =
        (torch::clamp(torch::round(x / a.scale) + a.zero_point, 0, 255) - a.zero_point) * a.scale;
    auto ref = torch::nn::functional::conv2d(
        xq, Dequantized(qw),
        torch::nn::functional::Conv2dFuncOptions().bias(b).stride(stride).padding(pad));
    ASSERT_EQ(y.sizes(), ref.sizes()) << "stride " << stride << " pad " << pad;
    EXPECT_LT((y - ref).abs().max().item<double>(), 1e-3 * ref.abs().max().item<double>())
        << "stride " << stride << " pad " << pad << " k " << k;
  }
}

}  // namespace
}  // namespace sd::quant
