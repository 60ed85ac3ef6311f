#include "stages/progressive_distillation/progressive_distillation_stage.h"

#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "sd/schedulers/scheduler.h"
#include "sd/train/distillation.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/distillation.h"
#include "stages/latents.h"
#include "stages/progressive_distillation/progressive_distillation_options.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

namespace {

std::vector<int64_t> Shifted(const std::vector<int64_t>& t, int64_t by) {
  std::vector<int64_t> out;
  out.reserve(t.size());
  for (const int64_t v : t) out.push_back(v - by);
  return out;
}

// A phase's finished student, kept in its checkpoint folder: the weights, then
// the marker that says they are whole.
struct PhaseResult {
  fs::path weights, done;
  explicit PhaseResult(const fs::path& dir)
      : weights(dir / "student.safetensors"), done(dir / "DONE") {}
};

}  // namespace

absl::Status ProgressiveDistillationStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  const auto& o = ctx.options<ProgressiveDistillationOptions>("progressive_distillation");
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  ASSIGN_OR_RETURN(StableDiffusion m, LoadForTraining(ctx, {}));
  ASSIGN_OR_RETURN(auto scheduler, MakeScheduler("ddim", m.scheduler_config));
  ASSIGN_OR_RETURN(UNet2DConditionModel teacher, LoadFrozenUNet(input, ctx.device));
  // A CFG-distilled input (Meng et al.'s order: guidance first, then steps) is
  // distilled at guidance scales drawn from guidance_range, the same w given
  // to teacher and student.
  const int64_t guidance_dim = teacher->config().time_cond_proj_dim;
  if (guidance_dim > 0 && o.guidance_range.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "progressive_distillation: the input ", input,
        " is CFG-distilled (its unet has time_cond_proj_dim ", guidance_dim,
        "); set progressive_distillation.guidance_range (e.g. [2, 14]) to distil its steps "
        "at those guidance scales"));
  CLIPTextModel& text_encoder = m.text_encoder;
  AutoencoderKL& vae = m.vae;
  UNet2DConditionModel& student = m.unet;
  Freeze(*text_encoder, ctx.device);
  Freeze(*vae, ctx.device);
  if (guidance_dim > 0 && o.guided_scale > 0)
    return absl::InvalidArgumentError(
        absl::StrCat("progressive_distillation.guided_scale: the input ", input,
                     " is CFG-distilled (one pass per step); guided_scale needs a two-pass model"));
  const double w = o.guided_scale;
  torch::Tensor empty_context;  // the unconditional prompt's, for guided targets
  if (w > 0) {
    torch::NoGradGuard ng;
    empty_context =
        text_encoder->forward(m.tokenizer.Tokenize({""}).to(ctx.device)).last_hidden_state;
  }
  student->to(ctx.device);
  student->train();

  const SchedulerConfig& sc = scheduler->config();
  const std::string& pt = sc.prediction_type;
  const int64_t T = sc.num_train_timesteps;
  const double clip = sc.clip_sample ? sc.clip_sample_range : 0;
  // uniform: every timestep a DDIM sampler of any spacing may start a step from,
  // except one whose step would not move (t = 0 onto alphas_cumprod[0]).
  TimestepSampling uniform{.min_timestep = sc.set_alpha_to_one ? 0 : 1};
  const int64_t global_batch = job.batch_size * ctx.world_size;
  const int64_t phases = static_cast<int64_t>(o.progressive_stages.size()) - 1;
  const bool attention = o.attention_weight > 0;
  PosteriorCache cache(o.train.cache_latents);

  std::optional<safetensors::TensorMap> teacher_weights;  // none: the input's
  nlohmann::json history = nlohmann::json::array();
  for (int64_t p = 1; p <= phases; ++p) {
    const int64_t k = o.progressive_stages[p], k_prev = o.progressive_stages[p - 1];
    // diffusers' DDIM steps from t to t - T / steps whatever the spacing; the
    // teacher's two steps: first the step it learned, then the rest.
    const int64_t step_size = T / k, teacher_step = T / k_prev;
    const fs::path dir = fs::path(ctx.checkpoint_dir) / absl::StrCat("phase-", k, "steps");
    // grid: the timesteps diffusers' DDIM gives the student at its spacing.
    TimestepSampling sampling = uniform;
    if (o.train.timestep_sampling == "grid") {
      SchedulerConfig student_sc = sc;
      student_sc.timestep_spacing = o.timestep_spacing;
      for (const double t : SpacedTimesteps(student_sc, k))
        sampling.grid.push_back(static_cast<int64_t>(t));
    }
    const PhaseResult result(dir);
    nlohmann::json phase = {{"teacher_steps", k_prev},
                            {"student_steps", k},
                            {"student_step", step_size},
                            {"teacher_step", teacher_step}};
    if (fs::exists(result.done)) {
      ASSIGN_OR_RETURN(teacher_weights, safetensors::Load(result.weights.string()));
      if (ctx.rank == 0)
        ctx.event(StageEvent::kInfo,
                  absl::StrCat("phase ", k_prev, "->", k, " steps: kept by an earlier attempt in ",
                               dir.string()));
      history.push_back(phase);
      continue;
    }
    if (teacher_weights) {
      RETURN_IF_ERROR(CopyWeights(*teacher, *teacher_weights, "the previous phase's student"));
      RETURN_IF_ERROR(CopyWeights(*student, *teacher_weights, "the previous phase's student"));
    }
    if (ctx.rank == 0)
      ctx.event(StageEvent::kInfo, absl::StrCat("phase ", p, "/", phases, ": ", k_prev, " -> ", k,
                                                " steps (student step ", step_size, ")"));

    TrainingPlan plan;
    plan.parts = {{"unet", student.get()}};
    ApplyStudentTraining(o.train, plan);
    plan.first_step = (p - 1) * o.train.steps;
    plan.total_steps = p * o.train.steps;
    plan.progress_total = phases * o.train.steps;
    plan.local_batch = job.batch_size;
    plan.resolution = student->config().sample_size * m.vae_scale_factor();
    plan.caption_dropout = job.caption_dropout;  // the student learns the unconditional teacher too
    plan.checkpoint_dir = dir.string();
    plan.checkpoint_state = {{"phase", p}, {"student_steps", k}, {"teacher_steps", k_prev}};
    plan.loss = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
      const NoisedLatents n =
          DrawNoisedLatents(ctx, vae, cache, batch, step, global_batch, sampling, T);
      torch::Tensor guidance;  // the UNets' timestep_cond, for a CFG-distilled input
      if (guidance_dim > 0)
        guidance = GuidanceScaleEmbedding(
            SampleGuidanceScales(ctx, step, global_batch, n.latents.size(0), o.guidance_range) -
                1.0,
            guidance_dim);
      const torch::Tensor tcpu = n.timesteps.cpu();
      const std::vector<int64_t> t(tcpu.data_ptr<int64_t>(),
                                   tcpu.data_ptr<int64_t>() + tcpu.numel());
      const std::vector<int64_t> mid = Shifted(t, teacher_step), end = Shifted(t, step_size);
      const NoiseLevel at = NoiseLevelAt(*scheduler, t, ctx.device);
      const NoiseLevel at_mid = NoiseLevelAt(*scheduler, mid, ctx.device);
      const NoiseLevel at_end = NoiseLevelAt(*scheduler, end, ctx.device);
      torch::Tensor z, context, target;
      std::vector<torch::Tensor> teacher_maps;
      {
        torch::NoGradGuard ng;
        z = scheduler->AddNoise(n.latents, n.noise, n.timesteps);
        context = text_encoder->forward(m.tokenizer.Tokenize(batch.captions).to(ctx.device))
                      .last_hidden_state;
        AutocastGuard autocast(o.train.mixed_precision, ctx.device);
        teacher->recorder().Clear();
        teacher->recorder().enabled = attention;
        // The teacher's output as its sampler uses it: guided at w when asked.
        const auto teacher_out = [&](const torch::Tensor& x,
                                     const torch::Tensor& tt) -> torch::Tensor {
          torch::Tensor c = teacher->forward(x, tt, context, guidance).to(torch::kFloat32);
          teacher->recorder().enabled = false;
          if (w == 0) return c;
          const torch::Tensor u =
              teacher->forward(x, tt, empty_context.expand({x.size(0), -1, -1}), guidance)
                  .to(torch::kFloat32);
          return u + w * (c - u);
        };
        const torch::Tensor first = teacher_out(z, n.timesteps);
        teacher_maps = std::move(teacher->recorder().maps);
        teacher->recorder().Clear();
        const torch::Tensor z_mid = DdimStep(pt, first, z, at, at_mid, clip);
        // A first step past t = 0 already ends the sampler: no second one.
        const auto mid_t = torch::tensor(mid, torch::kLong).clamp_min(0).to(ctx.device);
        const torch::Tensor second = teacher_out(z_mid, mid_t);
        const auto past_end =
            (torch::tensor(mid, torch::kLong) < 0).view({-1, 1, 1, 1}).to(ctx.device);
        const torch::Tensor z_end =
            torch::where(past_end, z_mid, DdimStep(pt, second, z_mid, at_mid, at_end, clip));
        target = DdimStepTarget(pt, z, z_end, at, at_end);
      }
      AutocastGuard autocast(o.train.mixed_precision, ctx.device);
      student->recorder().Clear();
      student->recorder().enabled = attention;
      torch::Tensor out = student->forward(z, n.timesteps, context, guidance).to(torch::kFloat32);
      student->recorder().enabled = false;
      if (w > 0) {
        const torch::Tensor u =
            student->forward(z, n.timesteps, empty_context.expand({z.size(0), -1, -1}), guidance)
                .to(torch::kFloat32);
        out = u + w * (out - u);
      }
      torch::Tensor loss =
          ((out - target).pow(2).mean({1, 2, 3}) * TruncatedSnrWeights(pt, at)).mean();
      if (attention)
        loss = loss + o.attention_weight * AttentionMapLoss(student->recorder().maps, teacher_maps);
      student->recorder().Clear();
      return loss;
    };
    ASSIGN_OR_RETURN(TrainedSteps run, RunTrainingSteps(ctx, plan));
    teacher_weights = run.trainer->Weights("unet");
    if (ctx.rank == 0) {
      if (ctx.fenced())
        return absl::AbortedError(absl::StrCat("stopped before keeping phase ", k, "'s student"));
      RETURN_IF_ERROR(safetensors::Save(result.weights.string(), *teacher_weights));
      RETURN_IF_ERROR(WriteFileAtomic(result.done.string(), "done\n"));
      if (o.keep_phase_models) {
        Student s{
            student->config().ToJson(),
            *teacher_weights,
            k,
            o.timestep_spacing,
            {{"stage", "progressive_distillation"}, {"phases", nlohmann::json::array({phase})}}};
        RETURN_IF_ERROR(WriteStudent(
            input,
            (fs::path(ctx.artifacts_dir) / "progressive_distillation" / absl::StrCat(k, "steps"))
                .string(),
            s));
      }
    }
    history.push_back(phase);
  }
  if (ctx.rank != 0) return absl::OkStatus();
  Student s;
  s.unet_config = student->config().ToJson();
  s.unet = *teacher_weights;
  s.steps = o.progressive_stages.back();
  s.timestep_spacing = o.timestep_spacing;
  s.distillation = {
      {"stage", "progressive_distillation"},
      {"progressive_stages", o.progressive_stages},
      {"phases", history},
      {"ema", o.train.ema},
      {"attention_weight", o.attention_weight},
      {"guided_scale", o.guided_scale},
      {"guidance", guidance_dim > 0 ? "distilled: one UNet pass per step (unet time_cond_proj_dim)"
                                    : "classifier-free: two UNet passes per step"}};
  if (guidance_dim > 0) s.distillation["guidance_range"] = o.guidance_range;
  return WriteStudent(input, ctx.output_dir, s);
}

std::unique_ptr<Stage> MakeProgressiveDistillationStage() {
  return std::make_unique<ProgressiveDistillationStage>();
}

}  // namespace sd::stages
