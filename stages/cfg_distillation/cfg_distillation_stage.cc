#include "stages/cfg_distillation/cfg_distillation_stage.h"

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "sd/io/json_config.h"
#include "sd/models/state_dict.h"
#include "sd/schedulers/scheduler.h"
#include "sd/train/distillation.h"
#include "sd/util/status_macros.h"
#include "stages/cfg_distillation/cfg_distillation_options.h"
#include "stages/distillation.h"
#include "stages/latents.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::Status CfgDistillationStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  const auto& o = ctx.options<CfgDistillationOptions>("cfg_distillation");
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  StableDiffusion::LoadOptions what;
  what.unet = false;  // the student is built below with its guidance input
  ASSIGN_OR_RETURN(StableDiffusion m, LoadForTraining(ctx, what));
  ASSIGN_OR_RETURN(auto scheduler, MakeScheduler("ddim", m.scheduler_config));
  ASSIGN_OR_RETURN(UNet2DConditionModel teacher, LoadFrozenUNet(input, ctx.device));
  if (teacher->config().time_cond_proj_dim > 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "cfg_distillation: the input ", input,
        " is CFG-distilled already (its unet has time_cond_proj_dim ",
        teacher->config().time_cond_proj_dim, "); its teacher needs two passes to guide"));
  UNetConfig student_config = teacher->config();
  student_config.time_cond_proj_dim = o.guidance_embedding_dim;
  UNet2DConditionModel student(student_config);
  safetensors::TensorMap init = StateDict(*teacher);
  // Zero: the student starts as the conditional teacher at every w.
  init["time_embedding.cond_proj.weight"] =
      torch::zeros({student_config.block_out_channels[0], o.guidance_embedding_dim});
  RETURN_IF_ERROR(CopyWeights(*student, init, absl::StrCat(input, "/unet")));
  student->to(ctx.device);
  student->train();
  Freeze(*m.text_encoder, ctx.device);
  Freeze(*m.vae, ctx.device);

  const std::string& pt = scheduler->config().prediction_type;
  const int64_t T = scheduler->config().num_train_timesteps;
  const int64_t global_batch = job.batch_size * ctx.world_size;
  // The student keeps its input's schedule and step count; only guidance changes.
  Student s;
  s.steps = DistilledSteps(input);
  if (s.steps == 0) s.steps = 50;
  ASSIGN_OR_RETURN(s.timestep_spacing, m.scheduler_config.String("timestep_spacing", "leading"));
  TimestepSampling sampling;  // uniform over [0, T)
  if (o.train.timestep_sampling == "grid") {
    SchedulerConfig grid_sc = scheduler->config();
    grid_sc.timestep_spacing = s.timestep_spacing;
    for (const double t : SpacedTimesteps(grid_sc, s.steps))
      sampling.grid.push_back(static_cast<int64_t>(t));
  }
  PosteriorCache cache(o.train.cache_latents);
  torch::Tensor empty_context;  // the unconditional prompt's, computed once
  {
    torch::NoGradGuard ng;
    empty_context =
        m.text_encoder->forward(m.tokenizer.Tokenize({""}).to(ctx.device)).last_hidden_state;
  }

  TrainingPlan plan;
  plan.parts = {{"unet", student.get()}};
  ApplyStudentTraining(o.train, plan);
  plan.total_steps = o.train.steps;
  plan.local_batch = job.batch_size;
  plan.resolution = student_config.sample_size * m.vae_scale_factor();
  plan.caption_dropout = job.caption_dropout;
  plan.loss = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const NoisedLatents n =
        DrawNoisedLatents(ctx, m.vae, cache, batch, step, global_batch, sampling, T);
    const int64_t b = n.latents.size(0);
    const torch::Tensor wt = SampleGuidanceScales(ctx, step, global_batch, b, o.guidance_range);
    const torch::Tensor tcpu = n.timesteps.cpu();
    const NoiseLevel at = NoiseLevelAt(
        *scheduler,
        std::vector<int64_t>(tcpu.data_ptr<int64_t>(), tcpu.data_ptr<int64_t>() + tcpu.numel()),
        ctx.device);
    torch::Tensor z, context, target;
    {
      torch::NoGradGuard ng;
      z = scheduler->AddNoise(n.latents, n.noise, n.timesteps);
      context = m.text_encoder->forward(m.tokenizer.Tokenize(batch.captions).to(ctx.device))
                    .last_hidden_state;
      AutocastGuard autocast(o.train.mixed_precision, ctx.device);
      // Both teacher passes in one batch, as a guided sampler runs them.
      const auto both = teacher
                            ->forward(torch::cat({z, z}), torch::cat({n.timesteps, n.timesteps}),
                                      torch::cat({empty_context.expand({b, -1, -1}), context}))
                            .to(torch::kFloat32)
                            .chunk(2);
      target = both[0] + wt.view({-1, 1, 1, 1}) * (both[1] - both[0]);
    }
    AutocastGuard autocast(o.train.mixed_precision, ctx.device);
    // diffusers' pipelines embed guidance_scale - 1.
    const torch::Tensor out =
        student
            ->forward(z, n.timesteps, context,
                      GuidanceScaleEmbedding(wt - 1.0, o.guidance_embedding_dim))
            .to(torch::kFloat32);
    return ((out - target).pow(2).mean({1, 2, 3}) * TruncatedSnrWeights(pt, at)).mean();
  };
  plan.outputs =
      [&](ParamTrainer& trainer, const std::shared_ptr<const CaptionedSource>&,
          const LoaderOptions&) -> absl::StatusOr<std::map<std::string, ComponentWeights>> {
    return std::map<std::string, ComponentWeights>{
        {"unet", {student_config.ToJson(), trainer.Weights("unet")}}};
  };
  std::ifstream prior(fs::path(input) / "distillation.json");
  const nlohmann::json before =
      prior ? nlohmann::json::parse(prior, nullptr, false) : nlohmann::json(nullptr);
  s.distillation = {{"stage", "cfg_distillation"},
                    {"guidance", "distilled: one UNet pass per step (unet time_cond_proj_dim)"},
                    {"guidance_range", o.guidance_range},
                    {"timestep_sampling", o.train.timestep_sampling},
                    {"input", before.is_discarded() ? nlohmann::json(nullptr) : before}};
  plan.write = [&](const std::string& out, std::map<std::string, ComponentWeights> replaced) {
    s.unet_config = replaced.at("unet").config;
    s.unet = std::move(replaced.at("unet").weights);
    return WriteStudent(input, out, s);
  };
  return RunTrainingStage(ctx, std::move(plan));
}

std::unique_ptr<Stage> MakeCfgDistillationStage() {
  return std::make_unique<CfgDistillationStage>();
}

}  // namespace sd::stages
