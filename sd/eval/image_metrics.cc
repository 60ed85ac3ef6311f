#include "sd/eval/image_metrics.h"

#include <cmath>

namespace sd::eval {
namespace {

torch::Tensor Nchw(const torch::Tensor& x) {
  auto y = x.to(torch::kFloat64);
  if (y.dim() == 3) y = y.unsqueeze(0);
  if (y.size(1) != 3 && y.size(-1) == 3) y = y.permute({0, 3, 1, 2});
  return y.contiguous();
}

}  // namespace

torch::Tensor MeanSquaredError(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).pow(2).flatten(1).mean(1);
}

torch::Tensor Psnr(const torch::Tensor& a, const torch::Tensor& b) {
  return -10.0 * torch::log10(MeanSquaredError(Nchw(a), Nchw(b)));
}

torch::Tensor Ssim(const torch::Tensor& a_in, const torch::Tensor& b_in) {
  const auto a = Nchw(a_in), b = Nchw(b_in);
  constexpr int kSize = 11;
  constexpr double kSigma = 1.5, kC1 = 0.01 * 0.01, kC2 = 0.03 * 0.03;
  auto g = torch::arange(kSize, torch::kFloat64) - (kSize - 1) / 2.0;
  g = torch::exp(-g.pow(2) / (2 * kSigma * kSigma));
  g = g / g.sum();
  const int64_t c = a.size(1);
  const auto window = torch::outer(g, g).expand({c, 1, kSize, kSize}).contiguous();
  auto filt = [&](const torch::Tensor& x) {
    // Per channel, valid positions only.
    return at::conv2d(x, window, torch::Tensor(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                      at::IntArrayRef{1, 1}, c);
  };
  const auto mu_a = filt(a), mu_b = filt(b);
  const auto var_a = filt(a * a) - mu_a.pow(2);
  const auto var_b = filt(b * b) - mu_b.pow(2);
  const auto cov = filt(a * b) - mu_a * mu_b;
  const auto map = ((2 * mu_a * mu_b + kC1) * (2 * cov + kC2)) /
                   ((mu_a.pow(2) + mu_b.pow(2) + kC1) * (var_a + var_b + kC2));
  return map.flatten(1).mean(1);
}

}  // namespace sd::eval
