#include "stages/distillation.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/io/json_config.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

void Freeze(torch::nn::Module& module, const torch::Device& device) {
  module.to(device);
  module.eval();
  for (auto& p : module.parameters()) p.requires_grad_(false);
}

absl::StatusOr<UNet2DConditionModel> LoadFrozenUNet(const std::string& model,
                                                    const torch::Device& device) {
  ASSIGN_OR_RETURN(UNet2DConditionModel unet,
                   LoadUNet((fs::path(model) / "unet").string(), /*copy_weights=*/true));
  Freeze(*unet, device);
  return unet;
}

absl::Status CopyWeights(torch::nn::Module& module, const safetensors::TensorMap& weights,
                         const std::string& origin) {
  torch::NoGradGuard ng;
  for (auto& p : module.named_parameters()) {
    const auto it = weights.find(p.key());
    if (it == weights.end())
      return absl::InvalidArgumentError(absl::StrCat(origin, " has no tensor ", p.key()));
    if (!it->second.sizes().equals(p.value().sizes()))
      return absl::InvalidArgumentError(absl::StrCat(origin, " tensor ", p.key(), " has shape ",
                                                     c10::str(it->second.sizes()), ", the model ",
                                                     c10::str(p.value().sizes())));
    p.value().copy_(it->second);
  }
  return absl::OkStatus();
}

torch::Tensor SampleGuidanceScales(const StageContext& ctx, int64_t step, int64_t global_batch,
                                   int64_t local_batch, const std::vector<double>& range) {
  constexpr int64_t kGuidanceStream = 0x6366672d77;  // "cfg-w"
  std::vector<float> w;
  for (int64_t j = 0; j < local_batch; ++j) {
    at::Generator g = SampleGenerator(ctx.job.seed ^ kGuidanceStream, step,
                                      step * global_batch + ctx.rank * local_batch + j);
    w.push_back(static_cast<float>(
        range[0] + (range[1] - range[0]) * at::rand({1}, g, torch::kFloat64).item<double>()));
  }
  return torch::tensor(w).to(ctx.device);
}

void ApplyStudentTraining(const StudentSchedule& o, TrainingPlan& plan) {
  plan.lr = o.lr;
  if (o.ema) plan.ema_decay = o.ema_decay;
  plan.ema_warmup = o.ema_warmup;
  plan.warmup_steps = o.lr_warmup_steps;
  plan.lr_scheduler = o.lr_scheduler;
  plan.max_grad_norm = o.max_grad_norm;
}

absl::Status WriteStudent(const std::string& input, const std::string& out, const Student& s) {
  RETURN_IF_ERROR(WriteModelWithComponents(input, out, {{"unet", {s.unet_config, s.unet}}}));
  const fs::path sched = fs::path(out) / "scheduler" / "scheduler_config.json";
  ASSIGN_OR_RETURN(JsonConfig in, JsonConfig::Load(sched.string()));
  nlohmann::json j = in.json();
  j["_class_name"] = "DDIMScheduler";
  j["timestep_spacing"] = s.timestep_spacing;
  // steps_offset shifts only the leading grid (trailing starts at T - 1 whatever
  // it is); diffusers' StableDiffusionPipeline resets anything but 1 with a warning.
  // The folder's files are copies or links of the input's: replace, never write through.
  std::error_code ec;
  fs::remove(sched, ec);
  RETURN_IF_ERROR(WriteFileAtomic(sched.string(), j.dump(2) + "\n"));
  // model_index.json names the scheduler class diffusers instantiates.
  const fs::path index = fs::path(out) / "model_index.json";
  ASSIGN_OR_RETURN(JsonConfig mi, JsonConfig::Load(index.string()));
  nlohmann::json m = mi.json();
  m["scheduler"] = {"diffusers", "DDIMScheduler"};
  fs::remove(index, ec);
  RETURN_IF_ERROR(WriteFileAtomic(index.string(), m.dump(2) + "\n"));
  nlohmann::json d = s.distillation;
  d["steps"] = s.steps;
  d["timestep_spacing"] = s.timestep_spacing;
  return WriteFileAtomic((fs::path(out) / "distillation.json").string(), d.dump(2) + "\n");
}

}  // namespace sd::stages
