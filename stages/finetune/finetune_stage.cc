#include "stages/finetune/finetune_stage.h"

#include <ATen/autocast_mode.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/schedulers/scheduler.h"
#include "sd/tokenizer/clip_tokenizer.h"
#include "sd/train/denoising_loss.h"
#include "sd/util/status_macros.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

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
  text_encoder->eval();
  vae->eval();
  unet->train();
  for (auto& p : text_encoder->parameters()) p.requires_grad_(false);
  for (auto& p : vae->parameters()) p.requires_grad_(false);

  ParamTrainer trainer(
      "unet", *unet, job.finetune_lr, 1e-2,
      job.finetune_ema ? std::optional<double>(job.finetune_ema_decay >= 0 ? job.finetune_ema_decay
                                                                           : job.ema_decay)
                       : std::nullopt);
  LoopOptions lo;
  ASSIGN_OR_RETURN(lo.start_step, trainer.Resume(ctx.checkpoint_dir));
  lo.total_steps = job.finetune_steps;
  lo.global_batch = job.batch_size * ctx.world_size;
  lo.lr = job.finetune_lr;
  lo.warmup_steps =
      job.lr_warmup_steps >= 0 ? job.lr_warmup_steps : std::min<int64_t>(500, lo.total_steps / 10);
  lo.max_grad_norm = job.max_grad_norm;
  lo.seed = job.seed;

  const LoaderOptions opts =
      MakeLoaderOptions(ctx, resolution, job.batch_size, job.caption_dropout);
  DataLoader loader(data, opts, lo.start_step);
  const int64_t T = scheduler->config().num_train_timesteps;

  auto loss_fn = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const int64_t b = batch.pixels.size(0);
    // One stream per sample: its timestep, posterior sample and noise.
    std::vector<at::Generator> gens;
    std::vector<int64_t> timesteps;
    for (int64_t j = 0; j < b; ++j) {
      const int64_t g = step * lo.global_batch + ctx.rank * b + j;
      gens.push_back(SampleGenerator(job.seed, step, g));
      timesteps.push_back(torch::randint(0, T, {1}, gens.back(), torch::kLong).item<int64_t>());
    }
    torch::Tensor latents, context, noise;
    {
      torch::NoGradGuard ng;
      const auto post = vae->encode(batch.pixels.to(ctx.device));
      const auto std = post.std();
      std::vector<torch::Tensor> lat, noises;
      for (int64_t j = 0; j < b; ++j) {
        auto eps_post = at::randn(post.mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device);
        noises.push_back(at::randn(post.mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device));
        lat.push_back(post.mean[j] + std[j] * eps_post);
      }
      latents = torch::stack(lat) * vae->config().scaling_factor;
      noise = torch::stack(noises);
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
    auto loss = DenoisingLoss(unet, *scheduler, latents, noise, t, context);
    if (autocast) {
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    return loss;
  };
  RETURN_IF_ERROR(RunTrainingLoop(ctx, trainer, loader, lo, loss_fn));
  if (ctx.rank != 0) return absl::OkStatus();
  return WriteModelWithComponent(model.string(), ctx.output_dir, "unet", unet->config().ToJson(),
                                 trainer.Weights());
}

}  // namespace sd::stages
