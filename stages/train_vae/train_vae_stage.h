#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Trains the model's AutoencoderKL as a reconstruction autoencoder: L1 + MSE on
// pixels of a posterior sample (optionally weighted toward the foreground), plus
// a small KL term toward N(0, I), AdamW with
// warm-up and clipping, data-parallel and resumable like every training stage.
// For teachers built from scratch (the toy world); SD1.5's own VAE is kept as is.
class TrainVaeStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
