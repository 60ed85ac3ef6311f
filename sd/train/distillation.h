#pragma once
// The arithmetic of step distillation (Salimans & Ho 2022): DDIM steps between
// arbitrary timesteps, the model output that makes one student step land where
// the teacher's steps landed, the truncated-SNR loss weights, and the
// attention-map loss. All per sample: t is a vector of timesteps.
#include <torch/torch.h>

#include <string>
#include <vector>

#include "sd/schedulers/scheduler.h"

namespace sd {

// sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]) per sample, [B, 1, 1, 1]
// float32 on `device`; t < 0 is the level DDIM ends on (Scheduler::AlphaCumprodAt).
struct NoiseLevel {
  torch::Tensor alpha, sigma;
};
NoiseLevel NoiseLevelAt(const Scheduler& scheduler, const std::vector<int64_t>& t,
                        const torch::Device& device);

// The clean sample a model output stands for at z (prediction_type epsilon,
// v_prediction or sample), and the noise it implies.
torch::Tensor PredictedSample(const std::string& prediction_type, const torch::Tensor& output,
                              const torch::Tensor& z, const NoiseLevel& at);
torch::Tensor PredictedNoise(const std::string& prediction_type, const torch::Tensor& output,
                             const torch::Tensor& z, const NoiseLevel& at);

// One deterministic DDIM step (eta 0) from z at level `from` to level `to`, as
// DDIMScheduler.step computes it (x0 clipped to +-clip when clip > 0).
torch::Tensor DdimStep(const std::string& prediction_type, const torch::Tensor& output,
                       const torch::Tensor& z, const NoiseLevel& from, const NoiseLevel& to,
                       double clip = 0);

// The output (in prediction_type) whose DDIM step from z_from at `from` lands
// exactly on z_to at `to`: a DDIM step is affine in the output, z_to = A z + B out,
// so out = (z_to - A z) / B (B != 0 whenever the levels differ).
torch::Tensor DdimStepTarget(const std::string& prediction_type, const torch::Tensor& z_from,
                             const torch::Tensor& z_to, const NoiseLevel& from,
                             const NoiseLevel& to);

// Per-sample factors [B] on the mean squared error of the output such that the
// loss is max(SNR, 1) * |x0_student - x0_target|^2 (the paper's truncated SNR
// weighting) whatever the parameterisation: v max(alpha^2, sigma^2), epsilon
// max(1, sigma^2 / alpha^2) (alpha^2 floored at 1e-4: at zero terminal SNR an
// epsilon model cannot express x0 at all), sample max(SNR, 1).
torch::Tensor TruncatedSnrWeights(const std::string& prediction_type, const NoiseLevel& at);

// Attention distillation: KL(teacher || student) of each attention map (rows are
// distributions over keys), averaged over batch, heads and queries, then over maps.
torch::Tensor AttentionMapLoss(const std::vector<torch::Tensor>& student,
                               const std::vector<torch::Tensor>& teacher);

}  // namespace sd
