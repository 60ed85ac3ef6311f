#pragma once
// Noise schedulers with diffusers' exact timestep spacing and update formulas.
// The pipeline drives them by step index; timesteps() are what the UNet sees.
#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/io/json_config.h"

namespace sd {

// The union of the scheduler_config.json keys the four schedulers read. Missing
// keys take the defaults of the scheduler class being built, as diffusers'
// SchedulerClass.from_config(other_config) does.
struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";
  std::vector<double> trained_betas;
  std::string prediction_type = "epsilon";
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 0;
  bool set_alpha_to_one = true;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool skip_prk_steps = false;
  bool rescale_betas_zero_snr = false;
  std::string interpolation_type = "linear";
  std::string final_sigmas_type = "zero";
  int64_t solver_order = 2;
  std::string algorithm_type = "dpmsolver++";
  std::string solver_type = "midpoint";
  bool lower_order_final = true;
  bool euler_at_final = false;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& c);
  virtual ~Scheduler() = default;

  virtual void SetTimesteps(int64_t num_inference_steps) = 0;
  const std::vector<double>& timesteps() const { return timesteps_; }
  virtual double init_noise_sigma() const { return 1.0; }
  virtual torch::Tensor ScaleModelInput(const torch::Tensor& sample, size_t step_index) {
    return sample;
  }
  // One denoising update for the step_index-th entry of timesteps().
  virtual torch::Tensor Step(const torch::Tensor& model_output, size_t step_index,
                             const torch::Tensor& sample) = 0;

  // Forward process q(x_t | x_0), for training: timesteps is an int64 tensor [B].
  torch::Tensor AddNoise(const torch::Tensor& x0, const torch::Tensor& noise,
                         const torch::Tensor& timesteps) const;
  // v-prediction target.
  torch::Tensor Velocity(const torch::Tensor& x0, const torch::Tensor& noise,
                         const torch::Tensor& timesteps) const;

  const SchedulerConfig& config() const { return config_; }
  const torch::Tensor& alphas_cumprod() const { return alphas_cumprod_; }  // float32 [T]
  // alphas_cumprod[t], or for t < 0 the one DDIM steps to past the last timestep
  // (1 with set_alpha_to_one, else alphas_cumprod[0]).
  float AlphaCumprodAt(int64_t t) const { return AlphaProdPrev(t); }

 protected:
  float AlphaProd(int64_t t) const { return acp_[t]; }
  // alpha_cumprod "before" timestep 0 (DDIM/PNDM's set_alpha_to_one).
  float AlphaProdPrev(int64_t t) const { return t >= 0 ? acp_[t] : final_alpha_cumprod_; }
  std::pair<torch::Tensor, torch::Tensor> SignalNoiseScales(const torch::Tensor& x0,
                                                            const torch::Tensor& t) const;
  SchedulerConfig config_;
  torch::Tensor alphas_cumprod_;
  std::vector<float> acp_;
  float final_alpha_cumprod_ = 1.0f;
  std::vector<double> timesteps_;
  int64_t num_inference_steps_ = 0;
};

// name: ddim, euler, dpm++2m (alias dpmsolver++), pndm.
absl::StatusOr<std::unique_ptr<Scheduler>> MakeScheduler(const std::string& name,
                                                         const JsonConfig& config);
std::vector<std::string> SchedulerNames();

// numpy-compatible helpers (np.linspace, np.round half-to-even, np.interp).
std::vector<double> NpLinspace(double start, double stop, int64_t num);
double NpRound(double x);
double NpInterp(double x, const std::vector<float>& fp);
// Descending timestep grid for diffusers' leading/trailing/linspace spacing. DDIM and
// PNDM round the linspace grid to integers; Euler keeps it fractional.
std::vector<double> SpacedTimesteps(const SchedulerConfig& c, int64_t num_inference_steps,
                                    bool round_linspace = true);

std::unique_ptr<Scheduler> MakeDDIM(const SchedulerConfig& c);
std::unique_ptr<Scheduler> MakeEulerDiscrete(const SchedulerConfig& c);
std::unique_ptr<Scheduler> MakeDPMSolverMultistep(const SchedulerConfig& c);
std::unique_ptr<Scheduler> MakePNDM(const SchedulerConfig& c);

}  // namespace sd
