// PNDMScheduler with skip_prk_steps (PLMS only), the SD1.5 default.
#include <cmath>

#include "sd/schedulers/scheduler.h"

namespace sd {
namespace {

class PNDMScheduler : public Scheduler {
 public:
  explicit PNDMScheduler(const SchedulerConfig& c) : Scheduler(c) {}

  void SetTimesteps(int64_t n) override {
    num_inference_steps_ = n;
    std::vector<double> asc = SpacedTimesteps(config_, n);
    std::reverse(asc.begin(), asc.end());
    // skip_prk_steps: the second-to-last timestep is repeated (PLMS warm-up).
    std::vector<double> plms(asc.begin(), asc.end() - 1);
    if (asc.size() >= 2) plms.push_back(asc[asc.size() - 2]);
    plms.push_back(asc.back());
    timesteps_.assign(plms.rbegin(), plms.rend());
    ets_.clear();
    counter_ = 0;
    cur_sample_ = torch::Tensor();
  }

  torch::Tensor Step(const torch::Tensor& eps_in, size_t i,
                     const torch::Tensor& sample_in) override {
    int64_t t = static_cast<int64_t>(timesteps_[i]);
    const int64_t ratio = config_.num_train_timesteps / num_inference_steps_;
    int64_t prev = t - ratio;
    torch::Tensor eps = eps_in, sample = sample_in;
    if (counter_ != 1) {
      if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
      ets_.push_back(eps_in);
    } else {
      prev = t;
      t = t + ratio;
    }
    const size_t n = ets_.size();
    if (n == 1 && counter_ == 0) {
      cur_sample_ = sample;
    } else if (n == 1 && counter_ == 1) {
      eps = (eps + ets_.back()) / 2;
      sample = cur_sample_;
      cur_sample_ = torch::Tensor();
    } else if (n == 2) {
      eps = (3 * ets_[n - 1] - ets_[n - 2]) / 2;
    } else if (n == 3) {
      eps = (23 * ets_[n - 1] - 16 * ets_[n - 2] + 5 * ets_[n - 3]) / 12;
    } else {
      eps = (1.0 / 24) * (55 * ets_[n - 1] - 59 * ets_[n - 2] + 37 * ets_[n - 3] - 9 * ets_[n - 4]);
    }
    ++counter_;
    return PrevSample(sample, t, prev, eps);
  }

 private:
  torch::Tensor PrevSample(const torch::Tensor& sample, int64_t t, int64_t prev,
                           torch::Tensor eps) const {
    const float a_t = AlphaProd(t);
    const float a_prev = AlphaProdPrev(prev);
    const float b_t = 1.0f - a_t, b_prev = 1.0f - a_prev;
    if (config_.prediction_type == "v_prediction")
      eps = std::sqrt(a_t) * eps + std::sqrt(b_t) * sample;
    const float sample_coeff = std::sqrt(a_prev / a_t);
    const float denom = a_t * std::sqrt(b_prev) + std::sqrt(a_t * b_t * a_prev);
    return sample_coeff * sample - (a_prev - a_t) * eps / denom;
  }
  std::vector<torch::Tensor> ets_;
  int64_t counter_ = 0;
  torch::Tensor cur_sample_;
};

}  // namespace

std::unique_ptr<Scheduler> MakePNDM(const SchedulerConfig& c) {
  return std::make_unique<PNDMScheduler>(c);
}

}  // namespace sd
