#pragma once
// INT8 calibration of a UNet on its own inputs: the float pipeline samples the
// calibration prompts at the model's sampling steps while observers record every
// convolution's inputs (Q-Diffusion's point: a diffusion UNet's activations
// change with the timestep, so the ranges must come from all of its steps).
// The clipping method is chosen by the image error it causes on held-out
// prompts, and layers whose own output error is too large stay float.
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/quant/unet_int8.h"

namespace sd::quant {

// Records a layer's inputs (exact range and a bounded uniform sample of values)
// and passes them through the float layer.
class RangeObserver : public LayerHook {
 public:
  explicit RangeObserver(uint64_t seed);
  torch::Tensor Forward(
      const torch::Tensor& x,
      const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) override;
  double min() const { return min_; }
  double max() const { return max_; }
  torch::Tensor samples() const;  // float32 [n]
  int64_t calls() const { return calls_; }

 private:
  double min_ = 0, max_ = 0;
  int64_t calls_ = 0;
  int64_t per_call_ = 512;
  std::vector<torch::Tensor> chunks_;
  int64_t stored_ = 0;
  at::Generator gen_;
};

// The input map of one convolution from what its observer saw:
//   absmax      the observed [min, max];
//   percentile  [0.01th, 99.99th] percentile of the sampled values;
//   mse         the range [a * min, a * max] (a in 0.2..1) that minimises the
//               quantization error of the sampled values.
absl::StatusOr<Affine> ChooseAffine(const RangeObserver& o, const std::string& method);

// Calibration's split of the UNet: an observer on every convolution that will
// run INT8, the Linear layers (dynamic: nothing to observe), the rule-float rest.
struct ConvObservation {
  Int8Plan base;  // float_layers and linears filled in
  std::map<std::string, std::shared_ptr<RangeObserver>> observers;
};
// Installs the observers as the convolutions' hooks (ClearHooks removes them).
// Without `convolutions` every convolution stays float (the Linear-only scope of
// torch's quantize_dynamic and torchao: more accurate, less fast).
ConvObservation ObserveConvolutions(UNet2DConditionModelImpl& unet, uint64_t seed,
                                    bool convolutions = true);
// `base` with each observed convolution's input map chosen by `method`.
absl::StatusOr<Int8Plan> PlanFromObservation(const ConvObservation& o, const std::string& method);

// While installed, a layer runs float (so the trajectory is the float model's)
// and also its INT8 kernel on the same input, summing both outputs' energy and
// their difference's: the layer's own signal-to-quantization-noise ratio.
class SqnrProbe : public LayerHook {
 public:
  explicit SqnrProbe(std::shared_ptr<LayerHook> int8) : int8_(std::move(int8)) {}
  torch::Tensor Forward(
      const torch::Tensor& x,
      const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) override;
  double sqnr_db() const;

 private:
  std::shared_ptr<LayerHook> int8_;
  double signal_ = 0, noise_ = 0;
};
// Applies `plan` keeping the float weights and wraps every INT8 layer in a
// SqnrProbe, the fused q/k/v form off so each projection is measured alone;
// ClearHooks removes them.
absl::StatusOr<std::map<std::string, std::shared_ptr<SqnrProbe>>> InstallSqnrProbes(
    UNet2DConditionModelImpl& unet, const Int8Plan& plan);

struct CalibrationOptions {
  std::vector<std::string> prompts;       // the calibration set
  std::vector<std::string> eval_prompts;  // held out: the clipping method is chosen on these
  int64_t steps = 50;                     // the model's own sampling steps
  double guidance_scale = 7.5;
  std::string scheduler = "default";
  int64_t batch = 8;  // prompts per pipeline call
  uint64_t seed = 0;
  std::string clipping = "auto";  // auto (measure all three) | absmax | percentile | mse
  double min_layer_sqnr_db = 20;  // below this a layer stays float
  bool convolutions = true;       // false: Linear layers only
  int64_t sqnr_prompts = 4;       // calibration prompts the per-layer error is measured on
  std::function<void(const std::string&)> log = [](const std::string&) {};
};

inline constexpr int64_t kMinCalibrationSamples = 8;

// Calibrates sd.unet (float, left float on return) and returns the INT8 plan,
// its `calibration` entry saying what was measured and chosen.
absl::StatusOr<Int8Plan> CalibrateUNetInt8(StableDiffusion& sd, const CalibrationOptions& o);

}  // namespace sd::quant
