#include "sd/schedulers/scheduler.h"

#include <algorithm>
#include <cfenv>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "sd/util/status_macros.h"

namespace sd {

std::vector<double> NpLinspace(double start, double stop, int64_t num) {
  std::vector<double> out(num);
  if (num == 1) {
    out[0] = start;
    return out;
  }
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) out[i] = static_cast<double>(i) * step + start;
  out[num - 1] = stop;
  return out;
}

double NpRound(double x) { return std::nearbyint(x); }  // default rounding: half to even

double NpInterp(double x, const std::vector<float>& fp) {
  // xp is 0..n-1
  const int64_t n = static_cast<int64_t>(fp.size());
  if (x <= 0) return fp[0];
  if (x >= n - 1) return fp[n - 1];
  const int64_t i = static_cast<int64_t>(std::floor(x));
  const double slope = (static_cast<double>(fp[i + 1]) - fp[i]);
  return slope * (x - static_cast<double>(i)) + fp[i];
}

std::vector<double> SpacedTimesteps(const SchedulerConfig& c, int64_t n, bool round_linspace) {
  std::vector<double> t;
  const int64_t T = c.num_train_timesteps;
  if (c.timestep_spacing == "linspace") {
    for (double v : NpLinspace(0, static_cast<double>(T - 1), n)) {
      t.push_back(round_linspace ? NpRound(v) : v);
    }
    std::reverse(t.begin(), t.end());
  } else if (c.timestep_spacing == "leading") {
    const int64_t ratio = T / n;
    for (int64_t i = n - 1; i >= 0; --i)
      t.push_back(static_cast<double>(i * ratio + c.steps_offset));
  } else {
    const double ratio = static_cast<double>(T) / static_cast<double>(n);
    const int64_t count = static_cast<int64_t>(std::ceil(static_cast<double>(T) / ratio));
    for (int64_t i = 0; i < count; ++i)
      t.push_back(NpRound(static_cast<double>(T) + i * -ratio) - 1);
  }
  return t;
}

Scheduler::Scheduler(const SchedulerConfig& c) : config_(c) {
  const int64_t n = c.num_train_timesteps;
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::Tensor betas;
  if (!c.trained_betas.empty()) {
    betas = torch::tensor(c.trained_betas, torch::kFloat64).to(torch::kFloat32);
  } else if (c.beta_schedule == "linear") {
    betas = torch::linspace(c.beta_start, c.beta_end, n, f32);
  } else if (c.beta_schedule == "scaled_linear") {
    betas = torch::linspace(std::sqrt(c.beta_start), std::sqrt(c.beta_end), n, f32).pow(2);
  } else {  // squaredcos_cap_v2, validated by MakeScheduler
    std::vector<double> b;
    auto alpha_bar = [](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2); };
    for (int64_t i = 0; i < n; ++i) {
      double t1 = static_cast<double>(i) / n, t2 = static_cast<double>(i + 1) / n;
      b.push_back(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
    }
    betas = torch::tensor(b, torch::kFloat64).to(torch::kFloat32);
  }
  if (c.rescale_betas_zero_snr) {
    auto abs = torch::cumprod(1.0 - betas, 0).sqrt();
    auto a0 = abs[0].clone(), at = abs[-1].clone();
    abs = (abs - at) * a0 / (a0 - at);
    auto ab = abs.pow(2);
    auto alphas = torch::cat({ab.slice(0, 0, 1), ab.slice(0, 1) / ab.slice(0, 0, -1)});
    betas = 1 - alphas;
  }
  alphas_cumprod_ = torch::cumprod(1.0 - betas, 0);
  if (c.rescale_betas_zero_snr) alphas_cumprod_[-1] = std::pow(2.0, -24);
  acp_.assign(alphas_cumprod_.data_ptr<float>(), alphas_cumprod_.data_ptr<float>() + n);
  final_alpha_cumprod_ = c.set_alpha_to_one ? 1.0f : acp_[0];
}

std::pair<torch::Tensor, torch::Tensor> Scheduler::SignalNoiseScales(const torch::Tensor& x0,
                                                                     const torch::Tensor& t) const {
  auto ac = alphas_cumprod_.to(x0.device()).index({t.to(x0.device())}).to(x0.scalar_type());
  return {ac.sqrt().view({-1, 1, 1, 1}), (1 - ac).sqrt().view({-1, 1, 1, 1})};
}

torch::Tensor Scheduler::AddNoise(const torch::Tensor& x0, const torch::Tensor& noise,
                                  const torch::Tensor& t) const {
  auto [a, s] = SignalNoiseScales(x0, t);
  return a * x0 + s * noise;
}

torch::Tensor Scheduler::Velocity(const torch::Tensor& x0, const torch::Tensor& noise,
                                  const torch::Tensor& t) const {
  auto [a, s] = SignalNoiseScales(x0, t);
  return a * noise - s * x0;
}

std::vector<std::string> SchedulerNames() { return {"ddim", "euler", "dpm++2m", "pndm"}; }

absl::StatusOr<std::unique_ptr<Scheduler>> MakeScheduler(const std::string& name,
                                                         const JsonConfig& j) {
  SchedulerConfig c;
  std::string kind = name;
  if (kind == "dpmsolver++" || kind == "dpm" || kind == "dpm++") kind = "dpm++2m";
  if (kind == "default") {
    ASSIGN_OR_RETURN(std::string cls, j.String("_class_name", "PNDMScheduler"));
    if (cls == "DDIMScheduler")
      kind = "ddim";
    else if (cls == "EulerDiscreteScheduler")
      kind = "euler";
    else if (cls == "DPMSolverMultistepScheduler")
      kind = "dpm++2m";
    else if (cls == "PNDMScheduler")
      kind = "pndm";
    else
      return j.Error("_class_name", "names a scheduler this build does not implement");
  }
  // Class defaults, then the config's keys on top.
  if (kind == "ddim") {
    c.timestep_spacing = "leading";
  } else if (kind == "pndm") {
    c.timestep_spacing = "leading";
    c.set_alpha_to_one = false;
  } else if (kind == "euler" || kind == "dpm++2m") {
    c.timestep_spacing = "linspace";
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown scheduler \"", name,
                     "\"; choose one of: ", absl::StrJoin(SchedulerNames(), ", ")));
  }
  ASSIGN_OR_RETURN(c.num_train_timesteps, j.Int("num_train_timesteps", c.num_train_timesteps));
  ASSIGN_OR_RETURN(c.beta_start, j.Double("beta_start", c.beta_start));
  ASSIGN_OR_RETURN(c.beta_end, j.Double("beta_end", c.beta_end));
  ASSIGN_OR_RETURN(c.beta_schedule, j.String("beta_schedule", c.beta_schedule));
  if (j.Has("trained_betas")) {
    ASSIGN_OR_RETURN(c.trained_betas, j.DoubleList("trained_betas"));
  }
  ASSIGN_OR_RETURN(c.prediction_type, j.String("prediction_type", c.prediction_type));
  ASSIGN_OR_RETURN(c.timestep_spacing, j.String("timestep_spacing", c.timestep_spacing));
  ASSIGN_OR_RETURN(c.steps_offset, j.Int("steps_offset", c.steps_offset));
  ASSIGN_OR_RETURN(c.set_alpha_to_one, j.Bool("set_alpha_to_one", c.set_alpha_to_one));
  ASSIGN_OR_RETURN(c.clip_sample, j.Bool("clip_sample", c.clip_sample));
  ASSIGN_OR_RETURN(c.clip_sample_range, j.Double("clip_sample_range", c.clip_sample_range));
  ASSIGN_OR_RETURN(c.skip_prk_steps, j.Bool("skip_prk_steps", c.skip_prk_steps));
  ASSIGN_OR_RETURN(c.rescale_betas_zero_snr,
                   j.Bool("rescale_betas_zero_snr", c.rescale_betas_zero_snr));
  ASSIGN_OR_RETURN(c.interpolation_type, j.String("interpolation_type", c.interpolation_type));
  ASSIGN_OR_RETURN(c.final_sigmas_type, j.String("final_sigmas_type", c.final_sigmas_type));
  ASSIGN_OR_RETURN(c.solver_order, j.Int("solver_order", c.solver_order));
  ASSIGN_OR_RETURN(c.algorithm_type, j.String("algorithm_type", c.algorithm_type));
  ASSIGN_OR_RETURN(c.solver_type, j.String("solver_type", c.solver_type));
  ASSIGN_OR_RETURN(c.lower_order_final, j.Bool("lower_order_final", c.lower_order_final));
  ASSIGN_OR_RETURN(c.euler_at_final, j.Bool("euler_at_final", c.euler_at_final));

  if (c.beta_schedule != "linear" && c.beta_schedule != "scaled_linear" &&
      c.beta_schedule != "squaredcos_cap_v2") {
    return j.Error("beta_schedule", "must be linear, scaled_linear or squaredcos_cap_v2");
  }
  if (c.prediction_type != "epsilon" && c.prediction_type != "v_prediction" &&
      c.prediction_type != "sample") {
    return j.Error("prediction_type", "must be epsilon, v_prediction or sample");
  }
  if (c.timestep_spacing != "leading" && c.timestep_spacing != "trailing" &&
      c.timestep_spacing != "linspace") {
    return j.Error("timestep_spacing", "must be leading, trailing or linspace");
  }
  if (c.num_train_timesteps < 2) return j.Error("num_train_timesteps", "must be at least 2");
  for (const char* key : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                          "use_lu_lambdas", "use_flow_sigmas", "thresholding"}) {
    ASSIGN_OR_RETURN(bool on, j.Bool(key, false));
    if (on) return j.Error(key, "is not supported");
  }
  if (kind == "euler" && c.interpolation_type != "linear")
    return j.Error("interpolation_type", "must be linear");
  if (c.final_sigmas_type != "zero" && c.final_sigmas_type != "sigma_min")
    return j.Error("final_sigmas_type", "must be zero or sigma_min");
  if (kind == "dpm++2m") {
    if (c.solver_order != 1 && c.solver_order != 2)
      return j.Error("solver_order", "must be 1 or 2");
    if (c.algorithm_type != "dpmsolver++" && c.algorithm_type != "dpmsolver")
      return j.Error("algorithm_type", "must be dpmsolver++ or dpmsolver");
    if (c.solver_type != "midpoint" && c.solver_type != "heun")
      return j.Error("solver_type", "must be midpoint or heun");
  }
  if (kind == "pndm") {
    if (!c.skip_prk_steps)
      return j.Error("skip_prk_steps", "must be true (the Runge-Kutta warm-up is not implemented)");
    if (c.prediction_type == "sample")
      return j.Error("prediction_type", "must be epsilon or v_prediction for PNDM");
  }
  if (kind == "ddim") return MakeDDIM(c);
  if (kind == "euler") return MakeEulerDiscrete(c);
  if (kind == "dpm++2m") return MakeDPMSolverMultistep(c);
  return MakePNDM(c);
}

}  // namespace sd
