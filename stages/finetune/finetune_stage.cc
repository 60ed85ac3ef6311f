#include "stages/finetune/finetune_stage.h"

#include <filesystem>
#include <map>
#include <optional>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/schedulers/scheduler.h"
#include "sd/tokenizer/clip_tokenizer.h"
#include "sd/train/denoising_loss.h"
#include "sd/train/foreground_weights.h"
#include "sd/util/status_macros.h"
#include "stages/finetune/finetune_options.h"
#include "stages/latents.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::Status FinetuneStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  const auto& o = ctx.options<FinetuneOptions>("finetune");
  ASSIGN_OR_RETURN(StableDiffusion m, LoadForTraining(ctx, {}));
  CLIPTextModel& text_encoder = m.text_encoder;
  AutoencoderKL& vae = m.vae;
  UNet2DConditionModel& unet = m.unet;
  ASSIGN_OR_RETURN(auto scheduler, MakeScheduler("ddim", m.scheduler_config));
  text_encoder->to(ctx.device);
  vae->to(ctx.device);
  unet->to(ctx.device);
  vae->eval();
  unet->train();
  for (auto& p : vae->parameters()) p.requires_grad_(false);
  // The text encoder learns with the UNet when asked (a teacher trained from
  // scratch needs words that mean something); otherwise it stays frozen as in
  // diffusers' train_text_to_image.
  const bool train_te = o.train_text_encoder;
  if (train_te) {
    text_encoder->train();
    if (!o.train_token_embedding) {
      auto params = text_encoder->named_parameters();
      if (auto* table = params.find("text_model.embeddings.token_embedding.weight"))
        table->requires_grad_(false);
    }
  } else {
    text_encoder->eval();
    for (auto& p : text_encoder->parameters()) p.requires_grad_(false);
  }

  TrainingPlan plan;
  plan.parts = {{"unet", unet.get()}};
  if (train_te) plan.parts.push_back({"text_encoder", text_encoder.get()});
  plan.lr = o.lr;
  if (o.ema) plan.ema_decay = o.ema_decay;
  plan.total_steps = o.steps;
  plan.warmup_steps =
      o.lr_warmup_steps >= 0 ? o.lr_warmup_steps : std::min<int64_t>(500, o.steps / 10);
  plan.lr_scheduler = o.lr_scheduler;
  plan.max_grad_norm = o.max_grad_norm;
  plan.local_batch = job.batch_size;
  plan.resolution = unet->config().sample_size * m.vae_scale_factor();
  plan.caption_dropout = job.caption_dropout;

  const int64_t global_batch = job.batch_size * ctx.world_size;
  const int64_t T = scheduler->config().num_train_timesteps;
  const TimestepSampling sampling{o.timestep_sampling == "logit_normal", o.logit_mean, o.logit_std};
  PosteriorCache cache(o.cache_latents);
  plan.loss = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const NoisedLatents n =
        DrawNoisedLatents(ctx, vae, cache, batch, step, global_batch, sampling, T);
    const torch::Tensor& latents = n.latents;
    torch::Tensor context;
    {
      std::optional<torch::NoGradGuard> ng;
      if (!train_te) ng.emplace();
      context = text_encoder->forward(m.tokenizer.Tokenize(batch.captions).to(ctx.device))
                    .last_hidden_state;
    }
    const torch::Tensor& t = n.timesteps;
    const torch::Tensor weights =
        o.foreground_weight > 0 ? ForegroundWeights(latents, o.foreground_weight) : torch::Tensor();
    const torch::Tensor sample_weights =
        o.snr_gamma > 0 ? MinSnrWeights(*scheduler, t, o.snr_gamma) : torch::Tensor();
    AutocastGuard autocast(o.mixed_precision, ctx.device);  // the UNet's forward only
    return DenoisingLoss(unet, *scheduler, latents, n.noise, t, context, weights, sample_weights);
  };
  plan.outputs =
      [&](ParamTrainer& trainer, const std::shared_ptr<const CaptionedSource>&,
          const LoaderOptions&) -> absl::StatusOr<std::map<std::string, ComponentWeights>> {
    std::map<std::string, ComponentWeights> out = {
        {"unet", {unet->config().ToJson(), trainer.Weights("unet")}}};
    if (train_te) {
      // Its config is unchanged: keep the file as transformers wrote it.
      ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
      ASSIGN_OR_RETURN(
          JsonConfig te_json,
          JsonConfig::Load((fs::path(input) / "text_encoder" / "config.json").string()));
      out["text_encoder"] = {te_json.json(), trainer.Weights("text_encoder")};
    }
    return out;
  };
  return RunTrainingStage(ctx, std::move(plan));
}

std::unique_ptr<Stage> MakeFinetuneStage() { return std::make_unique<FinetuneStage>(); }

}  // namespace sd::stages
