// EulerDiscreteScheduler (s_churn = 0, linear sigma interpolation).
#include <algorithm>
#include <cmath>

#include "sd/schedulers/scheduler.h"

namespace sd {
namespace {

class EulerDiscreteScheduler : public Scheduler {
 public:
  explicit EulerDiscreteScheduler(const SchedulerConfig& c) : Scheduler(c) {
    for (float a : acp_) train_sigmas_.push_back(std::sqrt((1.0f - a) / a));
  }

  void SetTimesteps(int64_t n) override {
    num_inference_steps_ = n;
    // Euler keeps diffusers' float32 timesteps (fractional with linspace spacing).
    std::vector<double> t;
    for (double v : SpacedTimesteps(config_, n, /*round_linspace=*/false))
      t.push_back(static_cast<float>(v));
    timesteps_ = t;
    sigmas_.clear();
    for (double ts : t) sigmas_.push_back(static_cast<float>(NpInterp(ts, train_sigmas_)));
    sigmas_.push_back(config_.final_sigmas_type == "sigma_min" ? train_sigmas_[0] : 0.0f);
  }

  double init_noise_sigma() const override {
    const float max_sigma = *std::max_element(sigmas_.begin(), sigmas_.end());
    if (config_.timestep_spacing == "linspace" || config_.timestep_spacing == "trailing")
      return max_sigma;
    return std::sqrt(max_sigma * max_sigma + 1.0f);
  }

  torch::Tensor ScaleModelInput(const torch::Tensor& sample, size_t i) override {
    const float s = sigmas_[i];
    return sample / std::sqrt(s * s + 1.0f);
  }

  torch::Tensor Step(const torch::Tensor& out, size_t i, const torch::Tensor& sample_in) override {
    auto sample = sample_in.to(torch::kFloat32);
    const float sigma = sigmas_[i];
    torch::Tensor x0;
    if (config_.prediction_type == "epsilon") {
      x0 = sample - sigma * out;
    } else if (config_.prediction_type == "v_prediction") {
      x0 = out * (-sigma / std::sqrt(sigma * sigma + 1.0f)) + sample / (sigma * sigma + 1.0f);
    } else {
      x0 = out;
    }
    auto derivative = (sample - x0) / sigma;
    const float dt = sigmas_[i + 1] - sigma;
    return (sample + derivative * dt).to(out.scalar_type());
  }

 private:
  std::vector<float> train_sigmas_;
  std::vector<float> sigmas_;
};

}  // namespace

std::unique_ptr<Scheduler> MakeEulerDiscrete(const SchedulerConfig& c) {
  return std::make_unique<EulerDiscreteScheduler>(c);
}

}  // namespace sd
