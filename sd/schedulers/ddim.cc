// DDIMScheduler (eta = 0, deterministic).
#include <cmath>

#include "sd/schedulers/scheduler.h"

namespace sd {
namespace {

class DDIMScheduler : public Scheduler {
 public:
  explicit DDIMScheduler(const SchedulerConfig& c) : Scheduler(c) {}

  void SetTimesteps(int64_t n) override {
    num_inference_steps_ = n;
    timesteps_ = SpacedTimesteps(config_, n);
  }

  torch::Tensor Step(const torch::Tensor& eps, size_t i, const torch::Tensor& sample) override {
    const int64_t t = static_cast<int64_t>(timesteps_[i]);
    const int64_t prev = t - config_.num_train_timesteps / num_inference_steps_;
    const float a_t = AlphaProd(t);
    const float a_prev = AlphaProdPrev(prev);
    const float b_t = 1.0f - a_t;
    torch::Tensor x0, pred_eps;
    if (config_.prediction_type == "epsilon") {
      x0 = (sample - std::sqrt(b_t) * eps) / std::sqrt(a_t);
      pred_eps = eps;
    } else if (config_.prediction_type == "sample") {
      x0 = eps;
      pred_eps = (sample - std::sqrt(a_t) * x0) / std::sqrt(b_t);
    } else {
      x0 = std::sqrt(a_t) * sample - std::sqrt(b_t) * eps;
      pred_eps = std::sqrt(a_t) * eps + std::sqrt(b_t) * sample;
    }
    if (config_.clip_sample) x0 = x0.clamp(-config_.clip_sample_range, config_.clip_sample_range);
    auto direction = std::sqrt(1.0f - a_prev) * pred_eps;
    return std::sqrt(a_prev) * x0 + direction;
  }

 private:
};

}  // namespace

std::unique_ptr<Scheduler> MakeDDIM(const SchedulerConfig& c) {
  return std::make_unique<DDIMScheduler>(c);
}

}  // namespace sd
