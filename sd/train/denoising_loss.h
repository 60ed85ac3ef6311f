#pragma once
// The denoising objective of diffusers' train_text_to_image: noise the latents at
// the given timesteps, predict, and take the MSE against the scheduler's target.
#include <torch/torch.h>

#include <vector>

#include "sd/models/unet_2d_condition.h"
#include "sd/schedulers/scheduler.h"

namespace sd {

// latents: clean (scaled) latents [B, C, h, w]; noise same shape; timesteps int64 [B].
// weights: optional per-position weights [B, 1, h, w]; the loss is then the
// weighted mean of the squared error. sample_weights: optional [B], a factor on
// each sample's error that the mean is not normalized by (MinSnrWeights).
// prediction, when given, receives the UNet's output (distillation losses read it).
torch::Tensor DenoisingLoss(UNet2DConditionModel& unet, const Scheduler& scheduler,
                            const torch::Tensor& latents, const torch::Tensor& noise,
                            const torch::Tensor& timesteps,
                            const torch::Tensor& encoder_hidden_states,
                            const torch::Tensor& weights = {},
                            const torch::Tensor& sample_weights = {},
                            torch::Tensor* prediction = nullptr);

// Min-SNR-gamma loss weights (Hang et al. 2023), float32 [B]: each timestep's
// weight on the clean-latent error is clipped at gamma. The prediction target
// already weights that error by SNR (epsilon) or SNR + 1 (v); the factor is
// min(that, gamma) / that. For v-prediction this differs from diffusers'
// min(SNR, gamma) / (SNR + 1) only where SNR < gamma - 1, i.e. at high noise:
// with a zero-terminal-SNR schedule diffusers' form gives the last timesteps,
// which decide layout and colors, no weight at all. Only the low-noise end,
// where the target is mostly the noise itself, is turned down.
torch::Tensor MinSnrWeights(const Scheduler& scheduler, const torch::Tensor& timesteps,
                            double gamma);

// Which training timesteps a step draws. Uniform is DDPM's. Logit-normal (as
// SD3 trains) draws t / T = sigmoid(mean + std * z): a positive mean spends
// more of a short run at high noise, where the caption alone has to decide
// what is drawn (the toy world's shapes come only from there).
struct TimestepSampling {
  bool logit_normal = false;
  double logit_mean = 0;
  double logit_std = 1;
  int64_t min_timestep = 0;   // uniform: from [min_timestep, num_train_timesteps)
  std::vector<int64_t> grid;  // non-empty: uniform over these timesteps instead
};

// One timestep in [0, num_train_timesteps) from the sample's own generator.
int64_t SampleTimestep(const TimestepSampling& sampling, int64_t num_train_timesteps,
                       at::Generator& gen);

}  // namespace sd
