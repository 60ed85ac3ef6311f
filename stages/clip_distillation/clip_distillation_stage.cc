#include "stages/clip_distillation/clip_distillation_stage.h"

#include <filesystem>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "sd/io/json_config.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/state_dict.h"
#include "sd/train/distillation.h"
#include "sd/util/status_macros.h"
#include "stages/distillation.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::StatusOr<std::vector<int64_t>> StudentLayerMap(const ClipDistillationOptions& o,
                                                     int64_t teacher_layers,
                                                     const std::string& origin) {
  if (!o.teacher_layers.empty()) {
    if (o.teacher_layers.back() >= teacher_layers)
      return absl::InvalidArgumentError(absl::StrCat(
          "clip_distillation.teacher_layers: names teacher layer ", o.teacher_layers.back(),
          ", but the text encoder of ", origin, " has layers 0..", teacher_layers - 1));
    return o.teacher_layers;
  }
  const int64_t n = o.layers > 0 ? o.layers : (teacher_layers + 1) / 2;
  if (n >= teacher_layers)
    return absl::InvalidArgumentError(
        absl::StrCat("clip_distillation.layers: ", n, " student layers for a teacher of ",
                     teacher_layers, " (", origin, "); the student must have fewer"));
  std::vector<int64_t> map;
  for (int64_t k = 0; k < n; ++k) map.push_back((k + 1) * teacher_layers / n - 1);
  return map;
}

namespace {

// The teacher's weights renamed for the student: layer map[k] becomes layer k,
// unmapped layers are left out, everything else is kept.
safetensors::TensorMap StudentInit(const safetensors::TensorMap& teacher,
                                   const std::vector<int64_t>& map) {
  const std::string layers = "text_model.encoder.layers.";
  std::map<int64_t, int64_t> student_of;
  for (size_t k = 0; k < map.size(); ++k) student_of[map[k]] = static_cast<int64_t>(k);
  safetensors::TensorMap out;
  for (const auto& [name, t] : teacher) {
    if (name.rfind(layers, 0) != 0) {
      out[name] = t;
      continue;
    }
    const std::string rest = name.substr(layers.size());
    const size_t dot = rest.find('.');
    int64_t i = 0;
    if (dot == std::string::npos || !absl::SimpleAtoi(rest.substr(0, dot), &i)) continue;
    if (auto it = student_of.find(i); it != student_of.end())
      out[absl::StrCat(layers, it->second, rest.substr(dot))] = t;
  }
  return out;
}

// Per sample, then averaged: a mean over the samples is what data parallelism
// splits exactly (a batch-wide ratio would differ from shard to shard).
torch::Tensor RelativeMse(const torch::Tensor& student, const torch::Tensor& teacher) {
  return ((student - teacher).pow(2).mean({1, 2}) / teacher.pow(2).mean({1, 2}).clamp_min(1e-12))
      .mean();
}

}  // namespace

absl::Status ClipDistillationStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  const auto& o = ctx.options<ClipDistillationOptions>("clip_distillation");
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  StableDiffusion::LoadOptions what;
  what.unet = false;
  what.vae = false;
  ASSIGN_OR_RETURN(StableDiffusion m, LoadForTraining(ctx, what));
  CLIPTextModel teacher = m.text_encoder;
  Freeze(*teacher, ctx.device);
  const std::string origin = (fs::path(input) / "text_encoder").string();
  ASSIGN_OR_RETURN(const std::vector<int64_t> map,
                   StudentLayerMap(o, teacher->config().num_hidden_layers, origin));

  CLIPTextConfig student_config = teacher->config();
  student_config.num_hidden_layers = static_cast<int64_t>(map.size());
  CLIPTextModel student(student_config);
  RETURN_IF_ERROR(CopyWeights(*student, StudentInit(StateDict(*teacher), map), origin));
  if (!o.train_token_embedding) {
    for (auto& p : student->named_parameters())
      if (p.key().find("token_embedding") != std::string::npos) p.value().set_requires_grad(false);
  }
  student->to(ctx.device);
  student->train();

  const bool maps = o.attention_weight > 0;
  TrainingPlan plan;
  plan.parts = {{"text_encoder", student.get()}};
  ApplyStudentTraining(o.train, plan);
  plan.total_steps = o.train.steps;
  plan.local_batch = o.batch_size > 0 ? o.batch_size : job.batch_size;
  plan.resolution = 0;  // captions only: no image is read or decoded
  plan.caption_dropout = o.empty_prompt_fraction;
  plan.loss = [&](int64_t, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const torch::Tensor ids = m.tokenizer.Tokenize(batch.captions).to(ctx.device);
    CLIPTextOutput t;
    {
      torch::NoGradGuard ng;
      t = teacher->forward(ids, -1, maps);
    }
    AutocastGuard autocast(o.train.mixed_precision, ctx.device);
    const CLIPTextOutput s = student->forward(ids, -1, maps);
    torch::Tensor loss = o.hidden_weight * (s.last_hidden_state.to(torch::kFloat32) -
                                            t.last_hidden_state.to(torch::kFloat32))
                                               .pow(2)
                                               .mean();
    if (o.intermediate_weight > 0) {
      torch::Tensor layers = torch::zeros({}, loss.options());
      for (size_t k = 0; k < map.size(); ++k)
        layers = layers + RelativeMse(s.hidden_states[k + 1].to(torch::kFloat32),
                                      t.hidden_states[map[k] + 1].to(torch::kFloat32));
      loss = loss + o.intermediate_weight * layers / static_cast<double>(map.size());
    }
    if (maps) {
      std::vector<torch::Tensor> mapped, own;
      mapped.reserve(map.size());
      own.reserve(map.size());
      for (size_t k = 0; k < map.size(); ++k) {
        mapped.push_back(t.attentions[map[k]].to(torch::kFloat32));
        own.push_back(s.attentions[k].to(torch::kFloat32));
      }
      loss = loss + o.attention_weight * AttentionMapLoss(own, mapped);
    }
    return loss;
  };
  plan.outputs =
      [&](ParamTrainer& trainer, const std::shared_ptr<const CaptionedSource>&,
          const LoaderOptions&) -> absl::StatusOr<std::map<std::string, ComponentWeights>> {
    // The input's own config (token ids, dtype, ...) with the new depth.
    ASSIGN_OR_RETURN(JsonConfig in, JsonConfig::Load((fs::path(origin) / "config.json").string()));
    nlohmann::json config = in.json();
    config["num_hidden_layers"] = student_config.num_hidden_layers;
    return std::map<std::string, ComponentWeights>{
        {"text_encoder", {config, trainer.Weights("text_encoder")}}};
  };
  return RunTrainingStage(ctx, std::move(plan));
}

std::unique_ptr<Stage> MakeClipDistillationStage() {
  return std::make_unique<ClipDistillationStage>();
}

}  // namespace sd::stages
