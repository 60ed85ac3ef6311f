#include "stages/train_vae/train_vae_stage.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/train/foreground_weights.h"
#include "sd/util/status_macros.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::Status TrainVaeStage::Validate(const JobSpec& job) const {
  return RequireDataset(job, name());
}

absl::Status TrainVaeStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  RETURN_IF_ERROR(Validate(job));
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  const fs::path model(input);
  ASSIGN_OR_RETURN(AutoencoderKL vae, LoadVAE((model / "vae").string(), true));
  // Train at the resolution the UNet will see, when the model says.
  int64_t resolution = vae->config().sample_size;
  if (fs::exists(model / "unet" / "config.json")) {
    ASSIGN_OR_RETURN(JsonConfig unet, JsonConfig::Load((model / "unet" / "config.json").string()));
    ASSIGN_OR_RETURN(const int64_t latent, unet.Int("sample_size", resolution));
    resolution = latent * (int64_t{1} << (vae->config().block_out_channels.size() - 1));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const CaptionedSource> data, OpenDataset(job.dataset));
  vae->to(ctx.device);
  vae->train();

  const int64_t local_batch = job.vae_batch_size > 0 ? job.vae_batch_size : job.batch_size;
  ParamTrainer trainer("vae", *vae, job.vae_lr, 1e-2, std::nullopt);
  LoopOptions lo;
  ASSIGN_OR_RETURN(lo.start_step, trainer.Resume(ctx));
  if (lo.start_step == 0 && vae->quant_conv) {
    // Start from a near-deterministic posterior (std ~0.01), where SD's VAE ends
    // up: from a random init's std ~1 the decoder first learns to ignore the
    // noise, i.e. to blur, and a short run never recovers the detail.
    torch::NoGradGuard ng;
    const int64_t c = vae->config().latent_channels;
    vae->quant_conv->bias.slice(0, c, 2 * c).fill_(-9.0);
    vae->quant_conv->weight.slice(0, c, 2 * c).mul_(0.01);
  }
  lo.total_steps = job.vae_steps;
  lo.global_batch = local_batch * ctx.world_size;
  lo.lr = job.vae_lr;
  lo.warmup_steps = std::min<int64_t>(100, lo.total_steps / 10);
  lo.schedule = job.vae_lr_scheduler;
  lo.max_grad_norm = job.max_grad_norm;
  lo.seed = job.seed;

  const LoaderOptions opts = MakeLoaderOptions(ctx, resolution, local_batch, 0.0);
  DataLoader loader(data, opts, lo.start_step);

  auto loss_fn = [&](int64_t step, const Batch& batch) -> absl::StatusOr<torch::Tensor> {
    const auto x = batch.pixels.to(ctx.device);
    const auto post = vae->encode(x);
    std::vector<torch::Tensor> eps;
    for (int64_t j = 0; j < x.size(0); ++j) {
      auto gen =
          SampleGenerator(job.seed, step, step * lo.global_batch + ctx.rank * local_batch + j);
      eps.push_back(at::randn(post.mean[j].sizes(), gen, torch::kFloat32));
    }
    const auto z = post.mean + post.std() * torch::stack(eps).to(ctx.device);
    const auto recon = vae->decode(z);
    const auto kl =
        0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).flatten(1).sum(1).mean();
    // Optional foreground weighting (sd/train/foreground_weights.h), so the
    // autoencoder learns small objects as early as the background.
    const torch::Tensor w = job.vae_foreground_weight > 0
                                ? ForegroundWeights(x, job.vae_foreground_weight)
                                : torch::ones({1}, x.options());
    const auto err = recon - x;
    return (w * err.abs()).mean() + (w * err.pow(2)).mean() + job.vae_kl_weight * kl;
  };
  RETURN_IF_ERROR(RunTrainingLoop(ctx, trainer, loader, lo, loss_fn));
  if (ctx.rank != 0) return absl::OkStatus();
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
  return WriteModelWithComponents(model.string(), ctx.output_dir,
                                  {{"vae", {vae->config().ToJson(), trainer.Weights("vae")}}});
}

}  // namespace sd::stages
