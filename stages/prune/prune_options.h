#pragma once
// Options of the prune stage (job.yaml section `prune:`).
#include <string>
#include <vector>

namespace sd::stages {

struct PruneOptions {
  // The share of channels removed per component; 0 leaves it as it is. The
  // UNet and the VAE take one ratio for every block_out_channels level or a
  // list with one per level (a level whose GroupNorm groups are too small for
  // the ratio can be kept whole instead of halved).
  std::vector<double> unet_ratio = {0.3};  // PRUNE_RATIO: whole channels of every block
  double text_encoder_ratio = 0.25;        // TEXT_ENCODER_PRUNE_RATIO: MLP neurons (fc1/fc2)
  std::vector<double> vae_ratio = {0.2};   // VAE_PRUNE_RATIO: encoder and decoder channels

  static bool Any(const std::vector<double>& r) {
    for (const double v : r)
      if (v > 0) return true;
    return false;
  }
  std::string criterion = "l1";  // channel importance: the L1 norm of the coupled weights
};

}  // namespace sd::stages
