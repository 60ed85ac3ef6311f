#pragma once
// The denoising objective of diffusers' train_text_to_image: noise the latents at
// the given timesteps, predict, and take the MSE against the scheduler's target.
#include <torch/torch.h>

#include "sd/models/unet_2d_condition.h"
#include "sd/schedulers/scheduler.h"

namespace sd {

// latents: clean (scaled) latents [B, C, h, w]; noise same shape; timesteps int64 [B].
// weights: optional per-position weights [B, 1, h, w]; the loss is then the
// weighted mean of the squared error.
torch::Tensor DenoisingLoss(UNet2DConditionModel& unet, const Scheduler& scheduler,
                            const torch::Tensor& latents, const torch::Tensor& noise,
                            const torch::Tensor& timesteps,
                            const torch::Tensor& encoder_hidden_states,
                            const torch::Tensor& weights = {});

}  // namespace sd
