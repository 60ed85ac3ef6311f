#include "stages/finetune/finetune_stage.h"

#include <filesystem>
#include <map>
#include <numeric>
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
namespace {

// The unpruned model to distill from, and the pruned input's pruning map.
// NOLINTNEXTLINE(bugprone-exception-escape): nlohmann::json's move checks invariants
struct KdTeacher {
  std::string dir;
  nlohmann::json map;  // empty when the input has none
};

absl::StatusOr<std::optional<KdTeacher>> ResolveTeacher(const std::string& input,
                                                        const std::string& setting) {
  if (setting == "none") return std::nullopt;
  KdTeacher t;
  const fs::path map_path = fs::path(input) / "pruning_map.json";
  if (fs::exists(map_path)) {
    ASSIGN_OR_RETURN(JsonConfig map, JsonConfig::Load(map_path.string()));
    t.map = map.json();
  }
  if (setting != "auto") {
    t.dir = setting;
  } else if (t.map.is_object()) {
    if (!t.map.contains("source") || !t.map["source"].is_string())
      return absl::InvalidArgumentError(
          absl::StrCat(map_path.string(), ": no \"source\" (the unpruned model) to distill from"));
    t.dir = t.map["source"].get<std::string>();
  } else {
    return std::nullopt;  // not a pruned model: plain fine-tuning
  }
  if (!fs::exists(fs::path(t.dir) / "model_index.json"))
    return absl::NotFoundError(
        absl::StrCat("finetune.teacher: ", t.dir,
                     setting == "auto" ? " (the unpruned model pruning_map.json names)" : "",
                     " is not a diffusers model folder; set finetune.teacher to one, or to none"));
  return t;
}

// Per block output (down blocks, mid, up blocks), the teacher channels the
// student's channels are: the pruning map's, or all when the UNet was not pruned.
absl::StatusOr<std::vector<torch::Tensor>> FeatureChannels(const KdTeacher& t,
                                                           const UNetConfig& student,
                                                           const UNetConfig& teacher) {
  auto widths = [](const UNetConfig& c) {
    std::vector<std::pair<std::string, int64_t>> w;
    const size_t n = c.block_out_channels.size();
    for (size_t i = 0; i < n; ++i)
      w.emplace_back(absl::StrCat("down_blocks.", i), c.block_out_channels[i]);
    if (c.mid_block) w.emplace_back("mid_block", c.block_out_channels.back());
    for (size_t i = 0; i < n; ++i)
      w.emplace_back(absl::StrCat("up_blocks.", i), c.block_out_channels[n - 1 - i]);
    return w;
  };
  const auto sw = widths(student), tw = widths(teacher);
  if (sw.size() != tw.size())
    return absl::InvalidArgumentError(absl::StrCat("finetune: the teacher UNet has ", tw.size(),
                                                   " blocks, the student ", sw.size()));
  const nlohmann::json* outputs = nullptr;
  if (t.map.is_object() && t.map.contains("components") && t.map["components"].contains("unet"))
    outputs = &t.map["components"]["unet"]["block_outputs"];
  std::vector<torch::Tensor> kept;
  for (size_t b = 0; b < sw.size(); ++b) {
    const auto& [name, width] = sw[b];
    std::vector<int64_t> idx(width);
    std::iota(idx.begin(), idx.end(), 0);
    if (outputs != nullptr) {
      if (!outputs->contains(name))
        return absl::InvalidArgumentError(
            absl::StrCat("pruning_map.json: components.unet.block_outputs has no ", name));
      idx = (*outputs)[name].get<std::vector<int64_t>>();
    }
    const int64_t top = idx.empty() ? -1 : *std::max_element(idx.begin(), idx.end());
    if (static_cast<int64_t>(idx.size()) != width || top >= tw[b].second)
      return absl::InvalidArgumentError(
          absl::StrCat("pruning_map.json does not fit these models: ", name, " keeps ", idx.size(),
                       " channels (highest ", top, ") of the teacher's ", tw[b].second,
                       ", and the student's has ", width));
    kept.push_back(torch::tensor(idx, torch::kLong));
  }
  return kept;
}

bool Pruned(const KdTeacher& t, const std::string& component) {
  return t.map.is_object() && t.map.contains("components") &&
         t.map["components"].contains(component);
}

}  // namespace

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

  ASSIGN_OR_RETURN(const std::string input_dir, InputModel(ctx));
  ASSIGN_OR_RETURN(const std::optional<KdTeacher> kd, ResolveTeacher(input_dir, o.teacher));
  std::optional<StableDiffusion> teacher;
  std::vector<torch::Tensor> feature_channels;
  bool recover_te = false, recover_vae = false;
  if (kd) {
    StableDiffusion::LoadOptions what;
    what.inference_layout = false;
    what.tokenizer = false;
    ASSIGN_OR_RETURN(teacher, StableDiffusion::Load(kd->dir, what));
    for (auto* mod : std::vector<torch::nn::Module*>{
             teacher->unet.get(), teacher->text_encoder.get(), teacher->vae.get()}) {
      mod->to(ctx.device);
      mod->eval();
      for (auto& p : mod->parameters()) p.requires_grad_(false);
    }
    ASSIGN_OR_RETURN(feature_channels,
                     FeatureChannels(*kd, unet->config(), teacher->unet->config()));
    for (auto& c : feature_channels) c = c.to(ctx.device);
    recover_te = o.recover_text_encoder && Pruned(*kd, "text_encoder");
    recover_vae = o.recover_vae && Pruned(*kd, "vae");
    if (recover_te && o.train_text_encoder)
      return absl::InvalidArgumentError(
          "finetune.train_text_encoder with a distillation teacher: the pruned text encoder "
          "recovers by hidden-state distillation (recover_text_encoder) instead");
    if (recover_vae) {
      // The decoder learns; the encoder (the UNet's latents come from the teacher's) stays.
      vae->train();
      for (auto& p : vae->decoder->parameters()) p.requires_grad_(true);
      if (vae->post_quant_conv)
        for (auto& p : vae->post_quant_conv->parameters()) p.requires_grad_(true);
    }
    ctx.event(StageEvent::kInfo, absl::StrCat("finetune: distilling from ", kd->dir,
                                              recover_te ? "; text encoder recovers" : "",
                                              recover_vae ? "; VAE decoder recovers" : ""));
  }
  // The latents the UNet learns on: the teacher's encoder when distilling (a
  // pruned encoder is not recovered), else the model's own.
  AutoencoderKL& latent_vae = teacher ? teacher->vae : vae;
  // The text encoder learns with the UNet when asked (a teacher trained from
  // scratch needs words that mean something); otherwise it stays frozen as in
  // diffusers' train_text_to_image.
  const bool train_te = o.train_text_encoder || recover_te;
  if (train_te) {
    text_encoder->train();
    if (!o.train_token_embedding || recover_te) {
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
  if (recover_vae) plan.parts.push_back({"vae", vae.get()});
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
        DrawNoisedLatents(ctx, latent_vae, cache, batch, step, global_batch, sampling, T);
    const torch::Tensor& latents = n.latents;
    const torch::Tensor ids = m.tokenizer.Tokenize(batch.captions).to(ctx.device);
    // The teacher's text states: its UNet's context, and the pruned encoder's target.
    CLIPTextOutput teacher_text;
    if (teacher) {
      torch::NoGradGuard tg;
      teacher_text = teacher->text_encoder->forward(ids);
    }
    torch::Tensor context, te_loss;
    {
      std::optional<torch::NoGradGuard> ng;
      if (!train_te) ng.emplace();
      CLIPTextOutput s = text_encoder->forward(ids);
      context = s.last_hidden_state;
      if (recover_te) {
        // Hidden-state distillation: every layer's output and the final states.
        te_loss = torch::mse_loss(s.last_hidden_state, teacher_text.last_hidden_state);
        for (size_t l = 1; l < s.hidden_states.size(); ++l)
          te_loss = te_loss + torch::mse_loss(s.hidden_states[l], teacher_text.hidden_states[l]) /
                                  static_cast<double>(s.hidden_states.size() - 1);
        context = context.detach();  // the UNet's loss does not move the encoder
      }
    }
    const torch::Tensor& t = n.timesteps;
    const torch::Tensor weights =
        o.foreground_weight > 0 ? ForegroundWeights(latents, o.foreground_weight) : torch::Tensor();
    const torch::Tensor sample_weights =
        o.snr_gamma > 0 ? MinSnrWeights(*scheduler, t, o.snr_gamma) : torch::Tensor();
    torch::Tensor loss;
    {
      AutocastGuard autocast(o.mixed_precision, ctx.device);  // the UNet's forward only
      if (!teacher) {
        return DenoisingLoss(unet, *scheduler, latents, n.noise, t, context, weights,
                             sample_weights);
      }
      std::vector<torch::Tensor> student_blocks, teacher_blocks;
      const bool features = o.kd_feature_weight > 0;
      if (features) unet->record_block_outputs(&student_blocks);
      torch::Tensor pred;
      const auto task = DenoisingLoss(unet, *scheduler, latents, n.noise, t, context, weights,
                                      sample_weights, &pred);
      unet->record_block_outputs(nullptr);
      torch::Tensor teacher_pred;
      {
        torch::NoGradGuard tg;
        if (features) teacher->unet->record_block_outputs(&teacher_blocks);
        teacher_pred = teacher->unet->forward(scheduler->AddNoise(latents, n.noise, t), t,
                                              teacher_text.last_hidden_state);
        teacher->unet->record_block_outputs(nullptr);
      }
      loss = o.task_weight * task +
             o.kd_output_weight *
                 torch::mse_loss(pred.to(torch::kFloat32), teacher_pred.to(torch::kFloat32));
      if (features) {
        if (student_blocks.size() != feature_channels.size() ||
            teacher_blocks.size() != feature_channels.size())
          return absl::InternalError("finetune: block outputs recorded do not match the blocks");
        for (size_t b = 0; b < feature_channels.size(); ++b) {
          loss =
              loss +
              o.kd_feature_weight *
                  torch::mse_loss(
                      student_blocks[b].to(torch::kFloat32),
                      teacher_blocks[b].index_select(1, feature_channels[b]).to(torch::kFloat32));
        }
      }
    }
    if (te_loss.defined()) loss = loss + te_loss;
    if (recover_vae) {
      // The decoder on the teacher's latents: the images, and the teacher's decodings.
      const auto z = latents / latent_vae->config().scaling_factor;
      torch::Tensor teacher_images;
      {
        torch::NoGradGuard tg;
        teacher_images = teacher->vae->decode(z);
      }
      const auto images = vae->decode(z);
      loss = loss + o.task_weight * torch::mse_loss(images, batch.pixels.to(ctx.device)) +
             o.kd_output_weight * torch::mse_loss(images, teacher_images);
    }
    return loss;
  };
  plan.outputs =
      [&](ParamTrainer& trainer, const std::shared_ptr<const CaptionedSource>&,
          const LoaderOptions&) -> absl::StatusOr<std::map<std::string, ComponentWeights>> {
    std::map<std::string, ComponentWeights> out = {
        {"unet", {unet->config().ToJson(), trainer.Weights("unet")}}};
    // Configs are unchanged: keep the files as transformers and diffusers wrote them.
    for (const auto& [stem, trained] : std::vector<std::pair<std::string, bool>>{
             {"text_encoder", train_te}, {"vae", recover_vae}}) {
      if (!trained) continue;
      ASSIGN_OR_RETURN(JsonConfig json,
                       JsonConfig::Load((fs::path(input_dir) / stem / "config.json").string()));
      out[stem] = {json.json(), trainer.Weights(stem)};
    }
    return out;
  };
  return RunTrainingStage(ctx, std::move(plan));
}

std::unique_ptr<Stage> MakeFinetuneStage() { return std::make_unique<FinetuneStage>(); }

}  // namespace sd::stages
