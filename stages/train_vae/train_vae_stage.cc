#include "stages/train_vae/train_vae_stage.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/util/status_macros.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::Status TrainVaeStage::Validate(const JobSpec& job) const {
  if (job.dataset.empty())
    return absl::InvalidArgumentError(
        "train_vae needs \"dataset\" (an image folder with metadata.jsonl, or WebDataset shards)");
  return absl::OkStatus();
}

absl::Status TrainVaeStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  RETURN_IF_ERROR(Validate(job));
  const fs::path model(ctx.input_model.empty() ? job.model : ctx.input_model);
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
  ASSIGN_OR_RETURN(lo.start_step, trainer.Resume(ctx.checkpoint_dir));
  lo.total_steps = job.vae_steps;
  lo.global_batch = local_batch * ctx.world_size;
  lo.lr = job.vae_lr;
  lo.warmup_steps = std::min<int64_t>(100, lo.total_steps / 10);
  lo.max_grad_norm = job.max_grad_norm;
  lo.seed = job.seed;

  LoaderOptions opts;
  opts.transform = {resolution, job.center_crop, job.random_flip, 0.0};
  opts.local_batch = local_batch;
  opts.rank = ctx.rank;
  opts.world_size = ctx.world_size;
  opts.seed = job.seed;
  DataLoader loader(data, opts, lo.start_step);

  auto loss_fn = [&](int64_t step) -> absl::StatusOr<torch::Tensor> {
    ASSIGN_OR_RETURN(Batch batch, loader.Next());
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
    return torch::l1_loss(recon, x) + torch::mse_loss(recon, x) + job.vae_kl_weight * kl;
  };
  RETURN_IF_ERROR(RunTrainingLoop(ctx, trainer, lo, loss_fn));
  if (ctx.rank != 0) return absl::OkStatus();
  // As for SD's VAE, scaling_factor = 1 / std of the latents over the data, so
  // the diffusion model sees unit-variance latents.
  vae->eval();
  {
    torch::NoGradGuard ng;
    auto final_weights = trainer.Weights();
    for (auto& p : vae->named_parameters()) p.value().copy_(final_weights.at(p.key()));
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
  return WriteModelWithComponent(model.string(), ctx.output_dir, "vae", vae->config().ToJson(),
                                 trainer.Weights());
}

}  // namespace sd::stages
