#pragma once
// Options of the prune stage (job.yaml section `prune:`).
#include <string>

namespace sd::stages {

struct PruneOptions {
  // The share of channels removed per component; 0 leaves it as it is.
  double unet_ratio = 0.3;           // PRUNE_RATIO: whole channels of every block
  double text_encoder_ratio = 0.25;  // TEXT_ENCODER_PRUNE_RATIO: MLP neurons (fc1/fc2)
  double vae_ratio = 0.2;            // VAE_PRUNE_RATIO: encoder and decoder channels
  std::string criterion = "l1";      // channel importance: the L1 norm of the coupled weights
};

}  // namespace sd::stages
