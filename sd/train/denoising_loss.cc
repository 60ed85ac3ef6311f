#include "sd/train/denoising_loss.h"

namespace sd {

torch::Tensor DenoisingLoss(UNet2DConditionModel& unet, const Scheduler& scheduler,
                            const torch::Tensor& latents, const torch::Tensor& noise,
                            const torch::Tensor& timesteps,
                            const torch::Tensor& encoder_hidden_states,
                            const torch::Tensor& weights) {
  auto noisy = scheduler.AddNoise(latents, noise, timesteps);
  const auto& pt = scheduler.config().prediction_type;
  torch::Tensor target = pt == "v_prediction" ? scheduler.Velocity(latents, noise, timesteps)
                         : pt == "sample"     ? latents
                                              : noise;
  auto pred = unet->forward(noisy, timesteps, encoder_hidden_states);
  if (!weights.defined())
    return torch::mse_loss(pred.to(torch::kFloat32), target.to(torch::kFloat32));
  const auto err = (pred.to(torch::kFloat32) - target.to(torch::kFloat32)).pow(2);
  const auto w = weights.to(torch::kFloat32).expand_as(err);
  return (w * err).sum() / w.sum();
}

}  // namespace sd
