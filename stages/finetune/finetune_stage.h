#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Denoising-loss training of the UNet as diffusers' train_text_to_image does it:
// frozen VAE and text encoder, noise + uniformly sampled timesteps, epsilon or v
// target, AdamW, constant LR after linear warm-up, gradient clipping, optional
// EMA. Every sample's data order, noise and timestep derive from (seed, step,
// global sample index), so N workers with batch b follow the same trajectory as
// one worker with batch N*b, and a resumed run continues exactly.
class FinetuneStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
