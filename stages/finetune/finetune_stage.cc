#include "stages/finetune/finetune_stage.h"

#include <ATen/autocast_mode.h>

#include <filesystem>
#include <map>
#include <optional>
#include <unordered_map>

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
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

namespace {
// The VAE is frozen here, so an image's posterior (mean, std) never changes: with
// a deterministic transform each image is encoded once, the first time a step
// draws it, and later epochs skip the encoder.
class PosteriorCache {
 public:
  explicit PosteriorCache(bool enabled) : enabled_(enabled) {}

  std::pair<torch::Tensor, torch::Tensor> Posterior(AutoencoderKL& vae, const Batch& batch,
                                                    const torch::Device& device) {
    if (!enabled_) {
      const auto post = vae->encode(batch.pixels.to(device));
      return {post.mean, post.std()};
    }
    // One image at a time: a posterior must not depend on which other images
    // shared its first batch, or a resumed run (cache empty again) would differ
    // from an uninterrupted one in the last bits.
    for (size_t j = 0; j < batch.indices.size(); ++j) {
      if (cache_.contains(batch.indices[j])) continue;
      const auto post = vae->encode(batch.pixels.slice(0, j, j + 1).to(device));
      cache_[batch.indices[j]] = {post.mean[0].clone(), post.std()[0].clone()};
    }
    std::vector<torch::Tensor> means, stds;
    for (const int64_t index : batch.indices) {
      const auto& [m, s] = cache_.at(index);
      means.push_back(m);
      stds.push_back(s);
    }
    return {torch::stack(means), torch::stack(stds)};
  }

 private:
  bool enabled_;
  std::unordered_map<int64_t, std::pair<torch::Tensor, torch::Tensor>> cache_;
};
}  // namespace

absl::Status FinetuneStage::Validate(const JobSpec& job) const {
  return RequireDataset(job, name());
}

absl::Status FinetuneStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  RETURN_IF_ERROR(Validate(job));
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  const fs::path model(input);
  ASSIGN_OR_RETURN(CLIPTokenizer tokenizer, CLIPTokenizer::Load((model / "tokenizer").string()));
  ASSIGN_OR_RETURN(CLIPTextModel text_encoder,
                   LoadCLIPTextModel((model / "text_encoder").string(), true));
  ASSIGN_OR_RETURN(AutoencoderKL vae, LoadVAE((model / "vae").string(), true));
  ASSIGN_OR_RETURN(UNet2DConditionModel unet, LoadUNet((model / "unet").string(), true));
  ASSIGN_OR_RETURN(JsonConfig sched_json,
                   JsonConfig::Load((model / "scheduler" / "scheduler_config.json").string()));
  ASSIGN_OR_RETURN(auto scheduler, MakeScheduler("ddim", sched_json));
  const int64_t resolution =
      unet->config().sample_size * (int64_t{1} << (vae->config().block_out_channels.size() - 1));
  ASSIGN_OR_RETURN(std::shared_ptr<const CaptionedSource> data, OpenDataset(job.dataset));

  text_encoder->to(ctx.device);
  vae->to(ctx.device);
  unet->to(ctx.device);
  vae->eval();
  unet->train();
  for (auto& p : vae->parameters()) p.requires_grad_(false);
  // The text encoder learns with the UNet when asked (a teacher trained from
  // scratch needs words that mean something); otherwise it stays frozen as in
  // diffusers' train_text_to_image.
  const bool train_te = job.finetune_text_encoder;
  if (train_te) {
    text_encoder->train();
    if (!job.finetune_token_embedding) {
      auto params = text_encoder->named_parameters();
      if (auto* table = params.find("text_model.embeddings.token_embedding.weight"))
        table->requires_grad_(false);
    }
  } else {
    text_encoder->eval();
    for (auto& p : text_encoder->parameters()) p.requires_grad_(false);
  }
  std::vector<TrainedPart> parts = {{"unet", unet.get()}};
  if (train_te) parts.push_back({"text_encoder", text_encoder.get()});

  ParamTrainer trainer(
      parts, job.finetune_lr, 1e-2,
      job.finetune_ema ? std::optional<double>(job.finetune_ema_decay >= 0 ? job.finetune_ema_decay
                                                                           : job.ema_decay)
                       : std::nullopt);
  LoopOptions lo;
  ASSIGN_OR_RETURN(lo.start_step, trainer.Resume(ctx));
  lo.total_steps = job.finetune_steps;
  lo.global_batch = job.batch_size * ctx.world_size;
  lo.lr = job.finetune_lr;
  lo.warmup_steps =
      job.lr_warmup_steps >= 0 ? job.lr_warmup_steps : std::min<int64_t>(500, lo.total_steps / 10);
  lo.schedule = job.finetune_lr_scheduler;
  lo.max_grad_norm = job.max_grad_norm;
  lo.seed = job.seed;

  const LoaderOptions opts =
      MakeLoaderOptions(ctx, resolution, job.batch_size, job.caption_dropout);
  DataLoader loader(data, opts, lo.start_step);
  const int64_t T = scheduler->config().num_train_timesteps;
  const TimestepSampling sampling{job.finetune_timestep_sampling == "logit_normal",
                                  job.finetune_logit_mean, job.finetune_logit_std};
  PosteriorCache cache(job.finetune_cache_latents);

  auto loss_fn = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const int64_t b = batch.pixels.size(0);
    // One stream per sample: its timestep, posterior sample and noise.
    std::vector<at::Generator> gens;
    std::vector<int64_t> timesteps;
    for (int64_t j = 0; j < b; ++j) {
      const int64_t g = step * lo.global_batch + ctx.rank * b + j;
      gens.push_back(SampleGenerator(job.seed, step, g));
      timesteps.push_back(SampleTimestep(sampling, T, gens.back()));
    }
    torch::Tensor latents, noise;
    {
      torch::NoGradGuard ng;
      const auto [mean, std] = cache.Posterior(vae, batch, ctx.device);
      std::vector<torch::Tensor> lat, noises;
      for (int64_t j = 0; j < b; ++j) {
        auto eps_post = at::randn(mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device);
        noises.push_back(at::randn(mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device));
        lat.push_back(mean[j] + std[j] * eps_post);
      }
      latents = torch::stack(lat) * vae->config().scaling_factor;
      noise = torch::stack(noises);
    }
    torch::Tensor context;
    {
      std::optional<torch::NoGradGuard> ng;
      if (!train_te) ng.emplace();
      context = text_encoder->forward(tokenizer.Tokenize(batch.captions).to(ctx.device))
                    .last_hidden_state;
    }
    auto t = torch::tensor(timesteps, torch::kLong).to(ctx.device);
    // bf16 autocast on CUDA: matmuls/convs in bf16, weights, optimizer and loss in fp32.
    const bool autocast = job.mixed_precision == "bf16" && ctx.device.is_cuda();
    if (autocast) {
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    }
    const torch::Tensor weights = job.finetune_foreground_weight > 0
                                      ? ForegroundWeights(latents, job.finetune_foreground_weight)
                                      : torch::Tensor();
    const torch::Tensor sample_weights = job.finetune_snr_gamma > 0
                                             ? MinSnrWeights(*scheduler, t, job.finetune_snr_gamma)
                                             : torch::Tensor();
    auto loss =
        DenoisingLoss(unet, *scheduler, latents, noise, t, context, weights, sample_weights);
    if (autocast) {
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    return loss;
  };
  RETURN_IF_ERROR(RunTrainingLoop(ctx, trainer, loader, lo, loss_fn));
  if (ctx.rank != 0) return absl::OkStatus();
  std::map<std::string, ComponentWeights> out = {
      {"unet", {unet->config().ToJson(), trainer.Weights("unet")}}};
  if (train_te) {
    // Its config is unchanged: keep the file as transformers wrote it.
    ASSIGN_OR_RETURN(JsonConfig te_json,
                     JsonConfig::Load((model / "text_encoder" / "config.json").string()));
    out["text_encoder"] = {te_json.json(), trainer.Weights("text_encoder")};
  }
  return WriteModelWithComponents(model.string(), ctx.output_dir, out);
}

}  // namespace sd::stages
