#pragma once
// What the distillation stages (progressive, CFG) share: a frozen copy of the
// teacher's UNet, copying weights between UNets, and writing a student as a
// complete diffusers folder whose scheduler config is the schedule it learned.
#include <torch/torch.h>

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "sd/io/safetensors.h"
#include "sd/models/unet_2d_condition.h"
#include "stages/stage.h"
#include "stages/training.h"
#include "stages/training_options.h"

namespace sd::stages {

// Moves `module` to `device` and freezes it (eval, no gradients): the teacher and
// the text encoder and VAE the students read through.
void Freeze(torch::nn::Module& module, const torch::Device& device);

// The UNet of model folder `model`, frozen (no gradients, eval) on `device`.
absl::StatusOr<UNet2DConditionModel> LoadFrozenUNet(const std::string& model,
                                                    const torch::Device& device);

// Copies `weights` into every parameter of `module` (in place: optimizers and
// views keep pointing at them). Names and shapes must match exactly.
absl::Status CopyWeights(torch::nn::Module& module, const safetensors::TensorMap& weights,
                         const std::string& origin);

// Per sample of this rank's batch, a guidance scale uniform in range [lo, hi]
// from its own stream (seed, step, global index), apart from the latents' so
// it changes no other draw; float32 [local_batch] on ctx.device.
torch::Tensor SampleGuidanceScales(const StageContext& ctx, int64_t step, int64_t global_batch,
                                   int64_t local_batch, const std::vector<double>& range);

// The plan's lr, EMA, schedule, warm-up and clipping from the student's options
// (its steps are the caller's: per phase or per stage).
void ApplyStudentTraining(const StudentSchedule& o, TrainingPlan& plan);

struct Student {
  nlohmann::json unet_config;
  safetensors::TensorMap unet;
  int64_t steps = 0;                          // the step count it was distilled for
  std::string timestep_spacing = "trailing";  // the DDIM spacing it was distilled for
  nlohmann::json distillation;                // what made it (written to distillation.json)
};
// Writes `input` with the student's UNet into `out`; scheduler/scheduler_config.json
// becomes DDIM with the student's spacing (a user asking diffusers for its step
// count gets the schedule it learned), and distillation.json records its steps.
absl::Status WriteStudent(const std::string& input, const std::string& out, const Student& s);

}  // namespace sd::stages
