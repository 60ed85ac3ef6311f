#pragma once
// What the UNet-training stages (finetune, the distillations) feed the UNet: the
// VAE latents of a batch, noised at per-sample timesteps, each sample's draws
// from its own generator so that any split over ranks and any resume give the
// same numbers.
#include <torch/torch.h>

#include <unordered_map>
#include <utility>

#include "sd/data/dataset.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/train/denoising_loss.h"
#include "stages/stage.h"

namespace sd::stages {

// The VAE is frozen in these stages, so an image's posterior (mean, std) never
// changes: with a deterministic transform each image is encoded once, the first
// time a step draws it, and later epochs skip the encoder.
class PosteriorCache {
 public:
  explicit PosteriorCache(bool enabled) : enabled_(enabled) {}
  std::pair<torch::Tensor, torch::Tensor> Posterior(AutoencoderKL& vae, const Batch& batch,
                                                    const torch::Device& device);

 private:
  bool enabled_;
  std::unordered_map<int64_t, std::pair<torch::Tensor, torch::Tensor>> cache_;
};

struct NoisedLatents {
  torch::Tensor latents;    // clean, scaled by the VAE's scaling_factor [B, C, h, w]
  torch::Tensor noise;      // [B, C, h, w]
  torch::Tensor timesteps;  // int64 [B], on the device
};

// Sample j of this rank's batch is global sample step * global_batch + rank * B + j;
// its generator (SampleGenerator(seed, step, global index)) draws its timestep,
// then the posterior sample, then the noise.
NoisedLatents DrawNoisedLatents(const StageContext& ctx, AutoencoderKL& vae, PosteriorCache& cache,
                                const Batch& batch, int64_t step, int64_t global_batch,
                                const TimestepSampling& sampling, int64_t num_train_timesteps);

}  // namespace sd::stages
