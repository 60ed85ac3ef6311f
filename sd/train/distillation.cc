#include "sd/train/distillation.h"

#include <cmath>

namespace sd {

NoiseLevel NoiseLevelAt(const Scheduler& scheduler, const std::vector<int64_t>& t,
                        const torch::Device& device) {
  std::vector<float> a, s;
  for (const int64_t v : t) {
    const double ac = scheduler.AlphaCumprodAt(v);
    a.push_back(static_cast<float>(std::sqrt(ac)));
    s.push_back(static_cast<float>(std::sqrt(1.0 - ac)));
  }
  const auto n = static_cast<int64_t>(t.size());
  return {torch::tensor(a).view({n, 1, 1, 1}).to(device),
          torch::tensor(s).view({n, 1, 1, 1}).to(device)};
}

torch::Tensor PredictedSample(const std::string& pt, const torch::Tensor& out,
                              const torch::Tensor& z, const NoiseLevel& at) {
  if (pt == "epsilon") return (z - at.sigma * out) / at.alpha;
  if (pt == "sample") return out;
  return at.alpha * z - at.sigma * out;  // v_prediction
}

torch::Tensor PredictedNoise(const std::string& pt, const torch::Tensor& out,
                             const torch::Tensor& z, const NoiseLevel& at) {
  if (pt == "epsilon") return out;
  if (pt == "sample") return (z - at.alpha * out) / at.sigma;
  return at.alpha * out + at.sigma * z;  // v_prediction
}

torch::Tensor DdimStep(const std::string& pt, const torch::Tensor& out, const torch::Tensor& z,
                       const NoiseLevel& from, const NoiseLevel& to, double clip) {
  torch::Tensor x0 = PredictedSample(pt, out, z, from);
  // The noise as DDIMScheduler derives it (from the output, not from the clipped x0).
  const torch::Tensor eps = PredictedNoise(pt, out, z, from);
  if (clip > 0) x0 = x0.clamp(-clip, clip);
  return to.alpha * x0 + to.sigma * eps;
}

torch::Tensor DdimStepTarget(const std::string& pt, const torch::Tensor& z_from,
                             const torch::Tensor& z_to, const NoiseLevel& from,
                             const NoiseLevel& to) {
  const auto &a = from.alpha, &s = from.sigma, &a2 = to.alpha, &s2 = to.sigma;
  torch::Tensor A, B;
  if (pt == "epsilon") {
    A = a2 / a;
    B = s2 - a2 * s / a;
  } else if (pt == "sample") {
    A = s2 / s;
    B = a2 - s2 * a / s;
  } else {  // v: x0 = a z - s v, eps = a v + s z
    A = a2 * a + s2 * s;
    B = s2 * a - a2 * s;
  }
  return (z_to - A * z_from) / B;
}

torch::Tensor TruncatedSnrWeights(const std::string& pt, const NoiseLevel& at) {
  const auto a2 = at.alpha.pow(2).flatten(), s2 = at.sigma.pow(2).flatten();
  if (pt == "v_prediction") return torch::maximum(a2, s2);
  if (pt == "epsilon") return torch::clamp_min(s2 / a2.clamp_min(1e-4), 1.0);
  return torch::clamp_min(a2 / s2.clamp_min(1e-12), 1.0);  // sample
}

torch::Tensor AttentionMapLoss(const std::vector<torch::Tensor>& student,
                               const std::vector<torch::Tensor>& teacher) {
  TORCH_CHECK(student.size() == teacher.size() && !student.empty(),
              "attention maps: the student recorded ", student.size(), ", the teacher ",
              teacher.size());
  torch::Tensor total;
  for (size_t i = 0; i < student.size(); ++i) {
    const auto& p = teacher[i];
    const auto kl =
        (p * (p.clamp_min(1e-12).log() - student[i].clamp_min(1e-12).log())).sum(-1).mean();
    total = total.defined() ? total + kl : kl;
  }
  return total / static_cast<double>(student.size());
}

}  // namespace sd
