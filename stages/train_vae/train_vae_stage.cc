#include "stages/train_vae/train_vae_stage.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/train/foreground_weights.h"
#include "sd/util/status_macros.h"
#include "stages/train_vae/train_vae_options.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::Status TrainVaeStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  const auto& o = ctx.options<TrainVaeOptions>("train_vae");
  StableDiffusion::LoadOptions what;
  what.tokenizer = what.text_encoder = what.unet = false;
  ASSIGN_OR_RETURN(StableDiffusion m, LoadForTraining(ctx, what));
  AutoencoderKL& vae = m.vae;
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  const fs::path model(input);
  // Train at the resolution the UNet will see, when the model says.
  int64_t resolution = vae->config().sample_size;
  if (fs::exists(model / "unet" / "config.json")) {
    ASSIGN_OR_RETURN(JsonConfig unet, JsonConfig::Load((model / "unet" / "config.json").string()));
    ASSIGN_OR_RETURN(const int64_t latent, unet.Int("sample_size", resolution));
    resolution = latent * m.vae_scale_factor();
  }
  vae->to(ctx.device);
  vae->train();

  TrainingPlan plan;
  plan.parts = {{"vae", vae.get()}};
  plan.lr = o.lr;
  plan.total_steps = o.steps;
  plan.warmup_steps = std::min<int64_t>(100, o.steps / 10);
  plan.lr_scheduler = o.lr_scheduler;
  plan.max_grad_norm = o.max_grad_norm;
  plan.local_batch = o.batch_size > 0 ? o.batch_size : job.batch_size;
  plan.resolution = resolution;
  plan.on_start = [&](int64_t start_step) {
    if (start_step != 0 || !vae->quant_conv) return;
    // Start from a near-deterministic posterior (std ~0.01), where SD's VAE ends
    // up: from a random init's std ~1 the decoder first learns to ignore the
    // noise, i.e. to blur, and a short run never recovers the detail.
    torch::NoGradGuard ng;
    const int64_t c = vae->config().latent_channels;
    vae->quant_conv->bias.slice(0, c, 2 * c).fill_(-9.0);
    vae->quant_conv->weight.slice(0, c, 2 * c).mul_(0.01);
  };
  const int64_t local_batch = plan.local_batch, global_batch = local_batch * ctx.world_size;
  plan.loss = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const auto x = batch.pixels.to(ctx.device);
    const auto post = vae->encode(x);
    std::vector<torch::Tensor> eps;
    for (int64_t j = 0; j < x.size(0); ++j) {
      auto gen = SampleGenerator(job.seed, step, step * global_batch + ctx.rank * local_batch + j);
      eps.push_back(at::randn(post.mean[j].sizes(), gen, torch::kFloat32));
    }
    const auto z = post.mean + post.std() * torch::stack(eps).to(ctx.device);
    const auto recon = vae->decode(z);
    const auto kl =
        0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).flatten(1).sum(1).mean();
    // Optional foreground weighting (sd/train/foreground_weights.h), so the
    // autoencoder learns small objects as early as the background.
    const torch::Tensor w = o.foreground_weight > 0 ? ForegroundWeights(x, o.foreground_weight)
                                                    : torch::ones({1}, x.options());
    const auto err = recon - x;
    return (w * err.abs()).mean() + (w * err.pow(2)).mean() + o.kl_weight * kl;
  };
  plan.outputs =
      [&](ParamTrainer& trainer, const std::shared_ptr<const CaptionedSource>& data,
          const LoaderOptions& opts) -> absl::StatusOr<std::map<std::string, ComponentWeights>> {
    // As for SD's VAE, scaling_factor = 1 / std of the latents over the data, so
    // the diffusion model sees unit-variance latents.
    vae->eval();
    {
      // No EMA for the VAE: its live parameters are the trained weights.
      torch::NoGradGuard ng;
      LoaderOptions so = opts;
      so.rank = 0;
      so.world_size = 1;
      so.local_batch = 16;
      so.prefetch = 0;
      DataLoader sample(data, so, 0);
      std::vector<torch::Tensor> means;
      for (int i = 0; i < 8; ++i) {
        ASSIGN_OR_RETURN(Batch b, sample.Next());
        means.push_back(vae->encode(b.pixels.to(ctx.device)).mean.cpu());
      }
      vae->mutable_config().scaling_factor = 1.0 / torch::cat(means).std().item<double>();
    }
    return std::map<std::string, ComponentWeights>{
        {"vae", {vae->config().ToJson(), trainer.Weights("vae")}}};
  };
  return RunTrainingStage(ctx, std::move(plan));
}

std::unique_ptr<Stage> MakeTrainVaeStage() { return std::make_unique<TrainVaeStage>(); }

}  // namespace sd::stages
