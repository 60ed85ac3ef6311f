#include "sd/quant/calibration.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/eval/image_metrics.h"
#include "sd/util/status_macros.h"

namespace sd::quant {
namespace {

// Bounded memory per layer whatever the number of prompts and steps.
constexpr int64_t kMaxStoredSamples = int64_t{1} << 20;

// The values of x in memory order (any dense layout), without a copy.
torch::Tensor FlatValues(const torch::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x.as_strided({x.numel()}, {1}, x.storage_offset());
  return x.contiguous().view({-1});
}

double MeanPsnr(const torch::Tensor& a, const torch::Tensor& b) {
  // Identical images are +inf; 100 dB stands for "no visible difference".
  return eval::Psnr(a, b).clamp_max(100.0).mean().item<double>();
}

std::vector<std::vector<std::string>> Batches(const std::vector<std::string>& prompts,
                                              int64_t batch) {
  std::vector<std::vector<std::string>> out;
  for (size_t i = 0; i < prompts.size(); i += static_cast<size_t>(batch)) {
    out.emplace_back(prompts.begin() + static_cast<int64_t>(i),
                     prompts.begin() + static_cast<int64_t>(std::min(
                                           prompts.size(), i + static_cast<size_t>(batch))));
  }
  return out;
}

absl::StatusOr<torch::Tensor> Sample(StableDiffusion& sd, const std::vector<std::string>& prompts,
                                     const CalibrationOptions& o) {
  std::vector<torch::Tensor> images;
  int64_t done = 0;
  for (const auto& b : Batches(prompts, o.batch)) {
    GenerateOptions g;
    g.prompts = b;
    g.steps = o.steps;
    g.guidance_scale = o.guidance_scale;
    g.scheduler = o.scheduler;
    // One seed per batch position, so a prompt's noise does not depend on its batch.
    g.seed = o.seed + static_cast<uint64_t>(done);
    ASSIGN_OR_RETURN(auto img, Generate(sd, g));
    images.push_back(img);
    done += static_cast<int64_t>(b.size());
  }
  return torch::cat(images, 0);
}

}  // namespace

RangeObserver::RangeObserver(uint64_t seed) : gen_(at::detail::createCPUGenerator(seed)) {}

torch::Tensor RangeObserver::Forward(
    const torch::Tensor& x,
    const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) {
  torch::NoGradGuard no_grad;
  auto flat = FlatValues(x.detach()).to(torch::kFloat32);
  auto [lo, hi] = torch::aminmax(flat);
  const double l = lo.item<double>(), h = hi.item<double>();
  min_ = calls_ == 0 ? l : std::min(min_, l);
  max_ = calls_ == 0 ? h : std::max(max_, h);
  ++calls_;
  const int64_t k = std::min<int64_t>(per_call_, flat.numel());
  auto idx = torch::randint(flat.numel(), {k}, gen_, torch::TensorOptions().dtype(torch::kLong));
  chunks_.push_back(flat.index_select(0, idx).clone());
  stored_ += k;
  if (stored_ > kMaxStoredSamples) {
    // Keep a uniform half of everything so far and sample half as densely from now on.
    auto all = torch::cat(chunks_);
    auto keep = torch::randperm(all.numel(), gen_).slice(0, 0, all.numel() / 2);
    chunks_ = {all.index_select(0, keep)};
    stored_ = chunks_[0].numel();
    per_call_ = std::max<int64_t>(16, per_call_ / 2);
  }
  return float_forward(x);
}

torch::Tensor RangeObserver::samples() const {
  return chunks_.empty() ? torch::zeros({1}) : torch::cat(chunks_);
}

absl::StatusOr<Affine> ChooseAffine(const RangeObserver& o, const std::string& method) {
  if (o.calls() == 0)
    return absl::FailedPreconditionError("the layer never ran during calibration");
  if (method == "absmax") return AffineForRange(o.min(), o.max());
  auto s = o.samples();
  if (method == "percentile") {
    auto sorted = std::get<0>(s.sort());
    const int64_t n = sorted.numel();
    auto at = [&](double q) {
      return sorted[std::clamp<int64_t>(static_cast<int64_t>(q * static_cast<double>(n - 1)), 0,
                                        n - 1)]
          .item<double>();
    };
    return AffineForRange(at(0.0001), at(0.9999));
  }
  if (method == "mse") {
    Affine best = AffineForRange(o.min(), o.max());
    double best_err = -1;
    for (int i = 0; i <= 40; ++i) {
      const double a = 1.0 - 0.02 * i;
      const Affine c = AffineForRange(a * o.min(), a * o.max());
      auto q = torch::clamp(torch::round(s / c.scale) + static_cast<double>(c.zero_point), 0, 255);
      const double err =
          (q - static_cast<double>(c.zero_point)).mul(c.scale).sub(s).pow(2).mean().item<double>();
      if (best_err < 0 || err < best_err) {
        best_err = err;
        best = c;
      }
    }
    return best;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown clipping method \"", method, "\" (absmax, percentile or mse)"));
}

ConvObservation ObserveConvolutions(UNet2DConditionModelImpl& unet, uint64_t seed,
                                    bool convolutions) {
  ConvObservation o;
  const auto layers = QuantizableLayers(unet);
  o.base.float_layers = RuleFloatLayers(layers);
  for (const auto& l : layers) {
    if (o.base.float_layers.count(l.name)) continue;
    if (l.linear) {
      o.base.linears.push_back(l.name);
      continue;
    }
    if (!convolutions) {
      o.base.float_layers[l.name] = "int8_convolutions: false (Linear layers only)";
      continue;
    }
    auto obs = std::make_shared<RangeObserver>(++seed);
    l.hook() = obs;
    o.observers[l.name] = std::move(obs);
  }
  return o;
}

absl::StatusOr<Int8Plan> PlanFromObservation(const ConvObservation& o, const std::string& method) {
  Int8Plan p = o.base;
  for (const auto& [name, obs] : o.observers) {
    auto a = ChooseAffine(*obs, method);
    if (!a.ok())
      return absl::FailedPreconditionError(
          absl::StrCat("INT8 calibration, layer ", name, ": ", a.status().message()));
    p.conv_inputs[name] = *a;
  }
  return p;
}

torch::Tensor SqnrProbe::Forward(
    const torch::Tensor& x,
    const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) {
  auto y = float_forward(x);
  auto yq = int8_->Forward(x, float_forward);
  const auto y64 = y.to(torch::kFloat64);
  signal_ += y64.pow(2).sum().item<double>();
  noise_ += (yq.to(torch::kFloat64) - y64).pow(2).sum().item<double>();
  return y;
}

double SqnrProbe::sqnr_db() const {
  if (noise_ <= 0) return 100.0;
  return 10.0 * std::log10(std::max(signal_, 1e-30) / noise_);
}

absl::StatusOr<std::map<std::string, std::shared_ptr<SqnrProbe>>> InstallSqnrProbes(
    UNet2DConditionModelImpl& unet, const Int8Plan& plan) {
  RETURN_IF_ERROR(ApplyInt8(unet, plan, /*release_float_weights=*/false));
  std::map<std::string, std::shared_ptr<SqnrProbe>> probes;
  for (const auto& l : QuantizableLayers(unet)) {
    if (!l.hook()) continue;
    probes[l.name] = std::make_shared<SqnrProbe>(l.hook());
    l.hook() = probes[l.name];
  }
  for (auto& m : unet.modules(false)) {
    if (auto* attn = m->as<AttentionImpl>()) attn->fused_hook.reset();
  }
  return probes;
}

absl::StatusOr<Int8Plan> CalibrateUNetInt8(StableDiffusion& sd, const CalibrationOptions& o) {
  if (!sd.unet) return absl::InvalidArgumentError("INT8 calibration: the model has no UNet");
  if (static_cast<int64_t>(o.prompts.size()) < kMinCalibrationSamples)
    return absl::InvalidArgumentError(
        absl::StrCat("INT8 calibration: ", o.prompts.size(), " calibration prompts, at least ",
                     kMinCalibrationSamples, " needed (activation ranges from fewer are noise)"));
  if (o.eval_prompts.empty())
    return absl::InvalidArgumentError("INT8 calibration: no held-out prompts to measure on");
  torch::NoGradGuard no_grad;
  auto& unet = *sd.unet;
  ClearHooks(unet);

  // 1. Observe every convolution's inputs over all calibration prompts and steps.
  const ConvObservation observed = ObserveConvolutions(unet, o.seed, o.convolutions);
  o.log(absl::StrCat("INT8 calibration: ", o.prompts.size(), " prompts x ", o.steps, " steps over ",
                     observed.observers.size(), " convolutions"));
  if (!observed.observers.empty()) {
    auto sampled = Sample(sd, o.prompts, o);
    ClearHooks(unet);
    RETURN_IF_ERROR(sampled.status());
  }

  auto image_psnr = [&](const Int8Plan& p,
                        const torch::Tensor& reference) -> absl::StatusOr<double> {
    RETURN_IF_ERROR(ApplyInt8(unet, p, /*release_float_weights=*/false));
    auto images = Sample(sd, o.eval_prompts, o);
    ClearHooks(unet);
    RETURN_IF_ERROR(images.status());
    return MeanPsnr(*images, reference);
  };

  // 2. The clipping method that costs the least image quality on held-out prompts.
  ASSIGN_OR_RETURN(const torch::Tensor reference, Sample(sd, o.eval_prompts, o));
  std::vector<std::string> methods = {"absmax", "percentile", "mse"};
  if (o.clipping != "auto") methods = {o.clipping};
  if (observed.observers.empty()) methods = {"none"};  // no static ranges to clip
  nlohmann::json by_method = nlohmann::json::object();
  std::string chosen;
  double chosen_psnr = -1;
  for (const auto& m : methods) {
    ASSIGN_OR_RETURN(Int8Plan p, PlanFromObservation(observed, m));
    ASSIGN_OR_RETURN(double psnr, image_psnr(p, reference));
    o.log(absl::StrFormat("INT8 calibration: clipping %s -> %.2f dB on %d held-out prompts", m,
                          psnr, o.eval_prompts.size()));
    by_method[m] = psnr;
    if (psnr > chosen_psnr) {
      chosen_psnr = psnr;
      chosen = m;
    }
  }
  ASSIGN_OR_RETURN(Int8Plan plan, PlanFromObservation(observed, chosen));

  // 3. Each layer's own error with the chosen ranges; the worst stay float.
  ASSIGN_OR_RETURN(const auto probes, InstallSqnrProbes(unet, plan));
  std::vector<std::string> sqnr_prompts(
      o.prompts.begin(),
      o.prompts.begin() +
          std::min<int64_t>(o.sqnr_prompts, static_cast<int64_t>(o.prompts.size())));
  auto probed = Sample(sd, sqnr_prompts, o);
  ClearHooks(unet);
  RETURN_IF_ERROR(probed.status());
  nlohmann::json sqnr = nlohmann::json::object();
  for (const auto& [name, p] : probes) {
    const double db = p->sqnr_db();
    sqnr[name] = std::round(db * 100) / 100;
    if (db < o.min_layer_sqnr_db) {
      plan.float_layers[name] = absl::StrFormat(
          "measured: its INT8 output is %.1f dB from float (< %.1f dB)", db, o.min_layer_sqnr_db);
      plan.conv_inputs.erase(name);
      plan.linears.erase(std::remove(plan.linears.begin(), plan.linears.end(), name),
                         plan.linears.end());
    }
  }
  ASSIGN_OR_RETURN(const double final_psnr, image_psnr(plan, reference));
  o.log(absl::StrFormat(
      "INT8 calibration: %d convolutions and %d linears in INT8, %d float; "
      "%.2f dB on held-out prompts",
      plan.conv_inputs.size(), plan.linears.size(), plan.float_layers.size(), final_psnr));
  plan.calibration = {{"prompts", o.prompts.size()},
                      {"steps", o.steps},
                      {"guidance_scale", o.guidance_scale},
                      {"scheduler", o.scheduler},
                      {"inputs",
                       "the float pipeline's own UNet inputs at every sampling step "
                       "(conditional and unconditional)"},
                      {"clipping_candidates_psnr_db", by_method},
                      {"clipping", chosen},
                      {"heldout_prompts", o.eval_prompts.size()},
                      {"min_layer_sqnr_db", o.min_layer_sqnr_db},
                      {"layer_sqnr_db", sqnr},
                      {"heldout_psnr_db", final_psnr}};
  return plan;
}

}  // namespace sd::quant
