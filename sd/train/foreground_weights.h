#pragma once
// Loss weights for images of small objects on flat backgrounds (the toy world):
// a plain mean spends a short training run on the background, which is most of
// every image, and learns the objects last.
#include <torch/torch.h>

namespace sd {

// Per-position weights 1 + w * d / max(d) for a batch x [B, C, h, w] (pixels or
// latents), d = max over channels of |x - the image's per-channel median|:
// positions unlike the image's background count up to 1 + w times as much.
// Returns [B, 1, h, w], without gradient.
torch::Tensor ForegroundWeights(const torch::Tensor& x, double w);

}  // namespace sd
