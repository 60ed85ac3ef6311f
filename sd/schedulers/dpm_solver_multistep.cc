// DPMSolverMultistepScheduler: DPM-Solver++ (2M by default), deterministic variants.
#include <cmath>

#include "sd/schedulers/scheduler.h"

namespace sd {
namespace {

class DPMSolverMultistepScheduler : public Scheduler {
 public:
  explicit DPMSolverMultistepScheduler(const SchedulerConfig& c) : Scheduler(c) {
    for (float a : acp_) train_sigmas_.push_back(std::sqrt((1.0f - a) / a));
  }

  void SetTimesteps(int64_t n) override {
    const int64_t T = config_.num_train_timesteps;  // lambda_min_clipped = -inf: nothing clipped
    std::vector<double> t;
    if (config_.timestep_spacing == "linspace") {
      auto v = NpLinspace(0, static_cast<double>(T - 1), n + 1);
      for (int64_t i = n; i >= 1; --i) t.push_back(NpRound(v[i]));
    } else if (config_.timestep_spacing == "leading") {
      const int64_t ratio = T / (n + 1);
      for (int64_t i = n; i >= 1; --i)
        t.push_back(static_cast<double>(i * ratio + config_.steps_offset));
    } else {
      const double ratio = static_cast<double>(T) / static_cast<double>(n);
      const int64_t count = static_cast<int64_t>(std::ceil(static_cast<double>(T) / ratio));
      for (int64_t i = 0; i < count; ++i)
        t.push_back(NpRound(static_cast<double>(T) + i * -ratio) - 1);
    }
    timesteps_ = t;
    num_inference_steps_ = static_cast<int64_t>(t.size());
    sigmas_.clear();
    for (double ts : t) sigmas_.push_back(static_cast<float>(NpInterp(ts, train_sigmas_)));
    sigmas_.push_back(config_.final_sigmas_type == "sigma_min" ? train_sigmas_[0] : 0.0f);
    outputs_.assign(config_.solver_order, torch::Tensor());
    lower_order_nums_ = 0;
  }

  torch::Tensor Step(const torch::Tensor& out, size_t i, const torch::Tensor& sample_in) override {
    const size_t n = timesteps_.size();
    const bool lower_final =
        i == n - 1 && (config_.euler_at_final || (config_.lower_order_final && n < 15) ||
                       config_.final_sigmas_type == "zero");
    const torch::Tensor m = ConvertModelOutput(out, i, sample_in);
    for (int64_t k = 0; k + 1 < config_.solver_order; ++k) outputs_[k] = outputs_[k + 1];
    outputs_.back() = m;
    auto sample = sample_in.to(torch::kFloat32);
    torch::Tensor prev;
    if (config_.solver_order == 1 || lower_order_nums_ < 1 || lower_final) {
      prev = FirstOrder(m, i, sample);
    } else {
      prev = SecondOrder(i, sample);
    }
    if (lower_order_nums_ < config_.solver_order) ++lower_order_nums_;
    return prev.to(out.scalar_type());
  }

 private:
  struct AlphaSigma {
    float alpha, sigma, lambda;
  };
  static AlphaSigma At(float s) {
    const float alpha = 1.0f / std::sqrt(s * s + 1.0f);
    const float sigma = s * alpha;
    return {alpha, sigma, std::log(alpha) - std::log(sigma)};
  }
  bool PlusPlus() const { return config_.algorithm_type == "dpmsolver++"; }

  torch::Tensor ConvertModelOutput(const torch::Tensor& out, size_t i,
                                   const torch::Tensor& sample) const {
    const AlphaSigma s = At(sigmas_[i]);
    const auto& p = config_.prediction_type;
    if (PlusPlus()) {
      if (p == "epsilon") return (sample - s.sigma * out) / s.alpha;
      if (p == "v_prediction") return s.alpha * sample - s.sigma * out;
      return out;
    }
    if (p == "epsilon") return out;
    if (p == "v_prediction") return s.alpha * out + s.sigma * sample;
    return (sample - s.alpha * out) / s.sigma;
  }

  torch::Tensor FirstOrder(const torch::Tensor& m, size_t i, const torch::Tensor& sample) const {
    const AlphaSigma t = At(sigmas_[i + 1]), s = At(sigmas_[i]);
    const float h = t.lambda - s.lambda;
    if (PlusPlus()) return (t.sigma / s.sigma) * sample - (t.alpha * (std::exp(-h) - 1.0f)) * m;
    return (t.alpha / s.alpha) * sample - (t.sigma * (std::exp(h) - 1.0f)) * m;
  }

  torch::Tensor SecondOrder(size_t i, const torch::Tensor& sample) const {
    const AlphaSigma t = At(sigmas_[i + 1]), s0 = At(sigmas_[i]), s1 = At(sigmas_[i - 1]);
    const auto& m0 = outputs_[outputs_.size() - 1];
    const auto& m1 = outputs_[outputs_.size() - 2];
    const float h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda;
    const float r0 = h0 / h;
    const auto& d0 = m0;
    const auto d1 = (1.0f / r0) * (m0 - m1);
    const bool mid = config_.solver_type == "midpoint";
    if (PlusPlus()) {
      const float e = std::exp(-h) - 1.0f;
      auto x = (t.sigma / s0.sigma) * sample - (t.alpha * e) * d0;
      return mid ? x - 0.5f * (t.alpha * e) * d1 : x + (t.alpha * (e / h + 1.0f)) * d1;
    }
    const float e = std::exp(h) - 1.0f;
    auto x = (t.alpha / s0.alpha) * sample - (t.sigma * e) * d0;
    return mid ? x - 0.5f * (t.sigma * e) * d1 : x - (t.sigma * (e / h - 1.0f)) * d1;
  }

  std::vector<float> train_sigmas_;
  std::vector<float> sigmas_;
  std::vector<torch::Tensor> outputs_;
  int64_t lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Scheduler> MakeDPMSolverMultistep(const SchedulerConfig& c) {
  return std::make_unique<DPMSolverMultistepScheduler>(c);
}

}  // namespace sd
