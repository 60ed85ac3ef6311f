#include "sd/train/denoising_loss.h"

#include <algorithm>
#include <cmath>

namespace sd {

torch::Tensor DenoisingLoss(UNet2DConditionModel& unet, const Scheduler& scheduler,
                            const torch::Tensor& latents, const torch::Tensor& noise,
                            const torch::Tensor& timesteps,
                            const torch::Tensor& encoder_hidden_states,
                            const torch::Tensor& weights, const torch::Tensor& sample_weights,
                            torch::Tensor* prediction) {
  auto noisy = scheduler.AddNoise(latents, noise, timesteps);
  const auto& pt = scheduler.config().prediction_type;
  torch::Tensor target = pt == "v_prediction" ? scheduler.Velocity(latents, noise, timesteps)
                         : pt == "sample"     ? latents
                                              : noise;
  auto pred = unet->forward(noisy, timesteps, encoder_hidden_states);
  if (prediction) *prediction = pred;
  auto err = (pred.to(torch::kFloat32) - target.to(torch::kFloat32)).pow(2);
  if (sample_weights.defined())
    err = err * sample_weights.to(err.device(), torch::kFloat32).view({-1, 1, 1, 1});
  if (!weights.defined()) return err.mean();
  const auto w = weights.to(torch::kFloat32).expand_as(err);
  return (w * err).sum() / w.sum();
}

torch::Tensor MinSnrWeights(const Scheduler& scheduler, const torch::Tensor& timesteps,
                            double gamma) {
  const auto ac = scheduler.alphas_cumprod().index_select(0, timesteps.cpu().to(torch::kLong));
  // At a zero-SNR timestep alphas_cumprod is 0 (or a tiny stand-in): snr 0.
  const auto snr = ac / (1 - ac).clamp_min(1e-12);
  const auto& pt = scheduler.config().prediction_type;
  if (pt == "sample") return torch::ones_like(snr);
  const auto natural = pt == "v_prediction" ? snr + 1 : snr;
  return (natural.clamp_max(gamma) / natural.clamp_min(1e-12)).to(timesteps.device());
}

int64_t SampleTimestep(const TimestepSampling& sampling, int64_t num_train_timesteps,
                       at::Generator& gen) {
  const int64_t T = num_train_timesteps;
  if (!sampling.grid.empty()) {
    const auto n = static_cast<int64_t>(sampling.grid.size());
    return sampling.grid[torch::randint(0, n, {1}, gen, torch::kLong).item<int64_t>()];
  }
  if (!sampling.logit_normal)
    return torch::randint(sampling.min_timestep, T, {1}, gen, torch::kLong).item<int64_t>();
  const double z = at::randn({1}, gen, torch::kFloat64).item<double>();
  const double u = 1 / (1 + std::exp(-(sampling.logit_mean + sampling.logit_std * z)));
  return std::clamp<int64_t>(static_cast<int64_t>(u * static_cast<double>(T)), 0, T - 1);
}

}  // namespace sd
