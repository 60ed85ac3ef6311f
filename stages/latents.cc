#include "stages/latents.h"

#include <vector>

namespace sd::stages {

std::pair<torch::Tensor, torch::Tensor> PosteriorCache::Posterior(AutoencoderKL& vae,
                                                                  const Batch& batch,
                                                                  const torch::Device& device) {
  if (!enabled_) {
    const auto post = vae->encode(batch.pixels.to(device));
    return {post.mean, post.std()};
  }
  // One image at a time: a posterior must not depend on which other images
  // shared its first batch, or a resumed run (cache empty again) would differ
  // from an uninterrupted one in the last bits.
  for (size_t j = 0; j < batch.indices.size(); ++j) {
    if (cache_.contains(batch.indices[j])) continue;
    const auto post = vae->encode(batch.pixels.slice(0, j, j + 1).to(device));
    cache_[batch.indices[j]] = {post.mean[0].clone(), post.std()[0].clone()};
  }
  std::vector<torch::Tensor> means, stds;
  for (const int64_t index : batch.indices) {
    const auto& [m, s] = cache_.at(index);
    means.push_back(m);
    stds.push_back(s);
  }
  return {torch::stack(means), torch::stack(stds)};
}

NoisedLatents DrawNoisedLatents(const StageContext& ctx, AutoencoderKL& vae, PosteriorCache& cache,
                                const Batch& batch, int64_t step, int64_t global_batch,
                                const TimestepSampling& sampling, int64_t num_train_timesteps) {
  const int64_t b = batch.pixels.size(0);
  std::vector<at::Generator> gens;
  std::vector<int64_t> timesteps;
  for (int64_t j = 0; j < b; ++j) {
    const int64_t g = step * global_batch + ctx.rank * b + j;
    gens.push_back(SampleGenerator(ctx.job.seed, step, g));
    timesteps.push_back(SampleTimestep(sampling, num_train_timesteps, gens.back()));
  }
  torch::NoGradGuard ng;
  const auto [mean, std] = cache.Posterior(vae, batch, ctx.device);
  std::vector<torch::Tensor> lat, noises;
  for (int64_t j = 0; j < b; ++j) {
    auto eps_post = at::randn(mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device);
    noises.push_back(at::randn(mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device));
    lat.push_back(mean[j] + std[j] * eps_post);
  }
  NoisedLatents out;
  out.latents = torch::stack(lat) * vae->config().scaling_factor;
  out.noise = torch::stack(noises);
  out.timesteps = torch::tensor(timesteps, torch::kLong).to(ctx.device);
  return out;
}

}  // namespace sd::stages
