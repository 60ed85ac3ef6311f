#include "stages/finetune/finetune_stage.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <chrono>
#include <filesystem>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "sd/data/image_folder.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/state_dict.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/schedulers/scheduler.h"
#include "sd/tokenizer/clip_tokenizer.h"
#include "sd/train/checkpoint.h"
#include "sd/train/denoising_loss.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::stages {
namespace fs = std::filesystem;
namespace {

at::Generator SampleGenerator(int64_t seed, int64_t step, int64_t index) {
  // splitmix-style mixing: independent streams per (seed, step, sample).
  uint64_t x = static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull ^
               static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull ^
               static_cast<uint64_t>(index) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return at::make_generator<at::CPUGeneratorImpl>(x);
}

// Epoch-wise shuffled order of the dataset, the same on every rank. The
// permutation is drawn once per epoch, not once per sample.
class DataOrder {
 public:
  DataOrder(int64_t seed, int64_t n) : seed_(seed), n_(n) {}
  int64_t Index(int64_t global_sample) {
    const int64_t epoch = global_sample / n_;
    if (epoch != epoch_) {
      auto gen = SampleGenerator(seed_, -1 - epoch, 0);
      perm_ = torch::randperm(n_, gen, torch::kLong);
      epoch_ = epoch;
    }
    return perm_[global_sample % n_].item<int64_t>();
  }

 private:
  int64_t seed_, n_, epoch_ = -1;
  torch::Tensor perm_;
};

absl::Status CopyComponent(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::create_directories(to, ec);
  fs::copy(from, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("cannot copy ", from.string(), " to ", to.string(), ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::Status FinetuneStage::Validate(const JobSpec& job) const {
  if (job.dataset.empty())
    return absl::InvalidArgumentError(
        "finetune needs \"dataset\" (an image folder with metadata.jsonl)");
  if (!fs::exists(fs::path(job.model) / "model_index.json")) {
    return absl::InvalidArgumentError(
        absl::StrCat("model ", job.model, " is not a diffusers folder (no model_index.json)"));
  }
  return absl::OkStatus();
}

absl::Status FinetuneStage::Run(StageContext& ctx) {
  const JobSpec& job = ctx.job;
  RETURN_IF_ERROR(Validate(job));
  const fs::path model(job.model);
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
  ASSIGN_OR_RETURN(ImageFolderDataset data, ImageFolderDataset::Open(job.dataset, resolution));

  text_encoder->to(ctx.device);
  vae->to(ctx.device);
  unet->to(ctx.device);
  text_encoder->eval();
  vae->eval();
  unet->train();
  for (auto& p : text_encoder->parameters()) p.requires_grad_(false);
  for (auto& p : vae->parameters()) p.requires_grad_(false);

  std::vector<std::string> names;
  std::vector<torch::Tensor> params;
  for (auto& p : unet->named_parameters()) {
    names.push_back(p.key());
    params.push_back(p.value());
  }
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(job.finetune_lr).weight_decay(1e-2));
  std::vector<torch::Tensor> ema;
  if (job.finetune_ema) {
    for (auto& p : params) ema.push_back(p.detach().clone());
  }

  // Resume.
  int64_t start = 0;
  std::vector<std::string> skipped;
  ASSIGN_OR_RETURN(auto ckpt, LoadLatestCheckpoint(ctx.checkpoint_dir, &skipped));
  if (ckpt.has_value()) {
    torch::NoGradGuard ng;
    const auto& w = ckpt->tensors.at("unet");
    const auto& o = ckpt->tensors.at("optimizer");
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].copy_(w.at(names[i]));
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(ckpt->state.at("adam_step").get<int64_t>());
      st->exp_avg(o.at(names[i] + ".exp_avg").clone());
      st->exp_avg_sq(o.at(names[i] + ".exp_avg_sq").clone());
      opt.state()[params[i].unsafeGetTensorImpl()] = std::move(st);
      if (!ema.empty()) ema[i].copy_(ckpt->tensors.at("ema").at(names[i]));
    }
    start = ckpt->state.at("step").get<int64_t>();
  }

  const int64_t total = job.finetune_steps;
  const int64_t warmup =
      job.lr_warmup_steps >= 0 ? job.lr_warmup_steps : std::min<int64_t>(500, total / 10);
  const int64_t local_batch = job.batch_size;
  const int64_t global_batch = local_batch * ctx.world_size;
  const int64_t n = static_cast<int64_t>(data.size());
  const int64_t T = scheduler->config().num_train_timesteps;

  auto save = [&](int64_t step) -> absl::Status {
    if (ctx.rank != 0) return absl::OkStatus();
    TrainingCheckpoint c;
    c.step = step;
    int64_t adam_step = 0;
    safetensors::TensorMap w, o, e;
    for (size_t i = 0; i < params.size(); ++i) {
      w[names[i]] = params[i].detach().cpu();
      auto it = opt.state().find(params[i].unsafeGetTensorImpl());
      if (it != opt.state().end()) {
        auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
        o[names[i] + ".exp_avg"] = st.exp_avg().cpu();
        o[names[i] + ".exp_avg_sq"] = st.exp_avg_sq().cpu();
        adam_step = st.step();
      }
      if (!ema.empty()) e[names[i]] = ema[i].cpu();
    }
    c.tensors["unet"] = std::move(w);
    c.tensors["optimizer"] = std::move(o);
    if (!ema.empty()) c.tensors["ema"] = std::move(e);
    c.state = {{"step", step},
               {"adam_step", adam_step},
               {"seed", job.seed},
               {"data_cursor", step * global_batch}};
    return WriteCheckpoint(ctx.checkpoint_dir, c);
  };

  DataOrder order(job.seed, n);
  for (int64_t step = start; step < total; ++step) {
    if (ctx.should_stop(step))
      return absl::AbortedError(absl::StrCat("finetune stopped at step ", step));
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<torch::Tensor> pixels, noises;
    std::vector<int64_t> timesteps;
    std::vector<std::string> captions;
    // One stream per sample: timestep now, posterior sample and noise once the
    // latent shape is known.
    std::vector<at::Generator> gens;
    for (int64_t j = 0; j < local_batch; ++j) {
      const int64_t g = step * global_batch + ctx.rank * local_batch + j;
      ASSIGN_OR_RETURN(CaptionedImage item, data.Get(static_cast<size_t>(order.Index(g))));
      pixels.push_back(item.pixels);
      captions.push_back(item.caption);
      gens.push_back(SampleGenerator(job.seed, step, g));
      timesteps.push_back(torch::randint(0, T, {1}, gens.back(), torch::kLong).item<int64_t>());
    }
    torch::Tensor latents, context;
    {
      torch::NoGradGuard ng;
      auto images = torch::stack(pixels).to(ctx.device);
      auto post = vae->encode(images);
      // Sample the posterior with the per-sample stream, like latent_dist.sample().
      std::vector<torch::Tensor> lat;
      const auto std = post.std();
      for (int64_t j = 0; j < local_batch; ++j) {
        auto eps_post = at::randn(post.mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device);
        noises.push_back(at::randn(post.mean[j].sizes(), gens[j], torch::kFloat32).to(ctx.device));
        lat.push_back(post.mean[j] + std[j] * eps_post);
      }
      latents = torch::stack(lat) * vae->config().scaling_factor;
      context =
          text_encoder->forward(tokenizer.Tokenize(captions).to(ctx.device)).last_hidden_state;
    }
    auto t = torch::tensor(timesteps, torch::kLong).to(ctx.device);
    // bf16 autocast on CUDA: matmuls/convs in bf16, weights, optimizer and loss in fp32.
    const bool autocast = job.mixed_precision == "bf16" && ctx.device.is_cuda();
    if (autocast) {
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    }
    auto loss = DenoisingLoss(unet, *scheduler, latents, torch::stack(noises), t, context);
    if (autocast) {
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    opt.zero_grad();
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (auto& p : params) grads.push_back(p.grad());
    ctx.all_reduce_mean(grads);
    torch::nn::utils::clip_grad_norm_(params, job.max_grad_norm);
    const double lr = warmup > 0
                          ? job.finetune_lr * std::min(1.0, static_cast<double>(step + 1) / warmup)
                          : job.finetune_lr;
    for (auto& group : opt.param_groups())
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    opt.step();
    if (!ema.empty()) {
      torch::NoGradGuard ng;
      for (size_t i = 0; i < params.size(); ++i)
        ema[i].mul_(job.ema_decay).add_(params[i].detach(), 1.0 - job.ema_decay);
    }
    StageProgress pr;
    pr.step = step + 1;
    pr.total_steps = total;
    pr.loss = loss.item<double>();
    pr.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pr.samples_per_s = static_cast<double>(global_batch) / pr.step_time_s;
    if ((step + 1) % job.checkpoint_interval == 0 || step + 1 == total) {
      const auto c0 = std::chrono::steady_clock::now();
      RETURN_IF_ERROR(save(step + 1));
      pr.checkpointed = ctx.rank == 0;
      pr.checkpoint_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
      for (const auto& p : params)
        pr.checkpoint_bytes += 3 * p.numel() * p.element_size();  // weights + 2 Adam moments
    }
    ctx.report(pr);
  }

  if (ctx.rank != 0) return absl::OkStatus();
  // The result: the teacher's folder with the fine-tuned (or EMA) UNet.
  const fs::path out(ctx.output_dir);
  for (const char* c : {"tokenizer", "text_encoder", "vae", "scheduler"})
    RETURN_IF_ERROR(CopyComponent(model / c, out / c));
  std::error_code ec;
  fs::copy_file(model / "model_index.json", out / "model_index.json",
                fs::copy_options::overwrite_existing, ec);
  fs::create_directories(out / "unet");
  safetensors::TensorMap final_weights;
  for (size_t i = 0; i < params.size(); ++i)
    final_weights[names[i]] = (ema.empty() ? params[i] : ema[i]).detach().cpu();
  RETURN_IF_ERROR(
      WriteFileAtomic((out / "unet" / "config.json").string(), unet->config().ToJson().dump(2)));
  return safetensors::Save((out / "unet" / "diffusion_pytorch_model.safetensors").string(),
                           final_weights);
}

}  // namespace sd::stages
