#include "sd/train/foreground_weights.h"

namespace sd {

torch::Tensor ForegroundWeights(const torch::Tensor& x, double w) {
  torch::NoGradGuard ng;
  const auto median = std::get<0>(x.flatten(2).median(2)).unsqueeze(-1).unsqueeze(-1);
  const auto d = std::get<0>((x - median).abs().max(1, true));
  const auto peak = std::get<0>(d.flatten(1).max(1)).clamp_min(1e-6).view({-1, 1, 1, 1});
  return 1 + w * d / peak;
}

}  // namespace sd
