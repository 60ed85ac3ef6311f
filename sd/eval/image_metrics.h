#pragma once
// Fidelity and diversity measures on images [N, H, W, 3] (or [N, 3, H, W]) with
// values in [0, 1]; each returns one value per image pair.
#include <torch/torch.h>

namespace sd::eval {

// 10 log10(1 / MSE) per pair; +inf for identical images.
torch::Tensor Psnr(const torch::Tensor& a, const torch::Tensor& b);
// Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, on each
// channel, averaged over the valid window positions and the channels.
torch::Tensor Ssim(const torch::Tensor& a, const torch::Tensor& b);
// Mean squared difference per pair, over all but the first dimension.
torch::Tensor MeanSquaredError(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace sd::eval
