#include "stages/training.h"

#include <ATen/autocast_mode.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "sd/models/state_dict.h"
#include "sd/train/checkpoint.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::stages {
namespace fs = std::filesystem;

ParamTrainer::ParamTrainer(const std::vector<TrainedPart>& parts, double lr, double weight_decay,
                           std::optional<double> ema_decay)
    : ema_decay_(ema_decay) {
  for (const TrainedPart& part : parts) {
    for (const auto& p : part.module->named_parameters()) {
      if (!p.value().requires_grad()) continue;
      part_.push_back(parts_.size());
      names_.push_back(p.key());
      params_.push_back(p.value());
    }
    parts_.push_back(part);
  }
  opt_ = std::make_unique<torch::optim::AdamW>(
      params_, torch::optim::AdamWOptions(lr).weight_decay(weight_decay));
  if (ema_decay_) {
    for (auto& p : params_) ema_.push_back(p.detach().clone());
  }
}

// Checkpoint file stems: a part's weights under its own name, its optimizer
// moments and EMA beside them.
namespace {
std::string OptimizerStem(const std::string& stem) { return stem + "_optimizer"; }
std::string EmaStem(const std::string& stem) { return stem + "_ema"; }
}  // namespace

absl::Status ParamTrainer::Usable(const TrainingCheckpoint& c) const {
  for (const char* key : {"step", "adam_step"}) {
    if (!c.state.contains(key) || !c.state[key].is_number_integer())
      return absl::DataLossError(absl::StrCat("manifest.json state has no integer \"", key, "\""));
  }
  for (const auto& [stem, module] : parts_) {
    for (const std::string& group :
         {stem, OptimizerStem(stem), ema_.empty() ? stem : EmaStem(stem)}) {
      if (!c.tensors.contains(group))
        return absl::DataLossError(absl::StrCat("checkpoint has no ", group,
                                                " tensors (it was written by another stage?)"));
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& stem = parts_[part_[i]].stem;
    const auto shape = params_[i].sizes();
    auto same = [&](const std::string& group, const std::string& name) -> absl::Status {
      const auto& g = c.tensors.at(group);
      const auto it = g.find(name);
      if (it == g.end())
        return absl::DataLossError(absl::StrCat(group, " tensor ", name, " is missing"));
      if (!it->second.sizes().equals(shape))
        return absl::DataLossError(absl::StrCat(group, " tensor ", name, " has shape ",
                                                c10::str(it->second.sizes()), ", the model ",
                                                c10::str(shape)));
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(same(stem, names_[i]));
    RETURN_IF_ERROR(same(OptimizerStem(stem), names_[i] + ".exp_avg"));
    RETURN_IF_ERROR(same(OptimizerStem(stem), names_[i] + ".exp_avg_sq"));
    if (!ema_.empty()) RETURN_IF_ERROR(same(EmaStem(stem), names_[i]));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParamTrainer::Resume(const std::string& checkpoint_dir,
                                             const ResumeOptions& o) {
  auto note = [&](StageEvent kind, const std::string& text) {
    if (o.event) o.event(kind, text);
  };
  if (o.remove_unfinished) {
    for (const auto& tmp : RemoveUnfinishedCheckpoints(checkpoint_dir))
      note(StageEvent::kInfo, absl::StrCat("removed ", tmp, ", a checkpoint write cut short"));
  }
  std::vector<std::string> rejected;
  ASSIGN_OR_RETURN(auto ckpt,
                   LoadLatestCheckpoint(checkpoint_dir, &rejected,
                                        [this](const TrainingCheckpoint& c) { return Usable(c); }));
  for (const auto& r : rejected)
    note(StageEvent::kCheckpointRejected, absl::StrCat("checkpoint rejected: ", r));
  if (!ckpt.has_value()) {
    if (rejected.empty()) return 0;
    // Silently starting over would throw away the training the log claims it resumed.
    if (!o.allow_restart_from_zero)
      return absl::DataLossError(absl::StrCat(
          "checkpoints exist in ", checkpoint_dir, " but none is usable (",
          absl::StrJoin(rejected, "; "),
          "); set allow_restart_from_zero: true in job.yaml to train again from step 0"));
    note(StageEvent::kInfo,
         "no usable checkpoint: training again from step 0 (allow_restart_from_zero)");
    return 0;
  }
  torch::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& stem = parts_[part_[i]].stem;
    const auto& o_state = ckpt->tensors.at(OptimizerStem(stem));
    params_[i].copy_(ckpt->tensors.at(stem).at(names_[i]));
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(ckpt->state.at("adam_step").get<int64_t>());
    st->exp_avg(o_state.at(names_[i] + ".exp_avg").to(params_[i].device()).clone());
    st->exp_avg_sq(o_state.at(names_[i] + ".exp_avg_sq").to(params_[i].device()).clone());
    opt_->state()[params_[i].unsafeGetTensorImpl()] = std::move(st);
    if (!ema_.empty()) ema_[i].copy_(ckpt->tensors.at(EmaStem(stem)).at(names_[i]));
  }
  // Checkpoints from before the counter: one EMA update per optimizer step.
  ema_updates_ = ckpt->state.value("ema_updates", ckpt->state.at("adam_step").get<int64_t>());
  const int64_t step = ckpt->state.at("step").get<int64_t>();
  note(StageEvent::kInfo, absl::StrCat("resumed from ", ckpt->dir, " (step ", step, ")"));
  return step;
}

absl::StatusOr<int64_t> ParamTrainer::Resume(const StageContext& ctx,
                                             const std::string& checkpoint_dir) {
  ResumeOptions o;
  o.allow_restart_from_zero = ctx.job.allow_restart_from_zero;
  // Every rank reads the same checkpoints; one of them speaks and cleans up.
  o.remove_unfinished = ctx.rank == 0;
  if (ctx.rank == 0) o.event = ctx.event;
  return Resume(checkpoint_dir, o);
}

double EmaWarmupDecay(int64_t update, double ema_decay) {
  const int64_t step = update - 1;
  if (step <= 0) return 0.0;
  return std::min(ema_decay, 1.0 - std::pow(1.0 + static_cast<double>(step), -2.0 / 3.0));
}

void ParamTrainer::Step(double lr, double max_grad_norm, Collectives& collectives) {
  std::vector<torch::Tensor> grads;
  for (auto& p : params_) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    grads.push_back(p.grad());
  }
  collectives.AllReduceMean(grads);
  torch::nn::utils::clip_grad_norm_(params_, max_grad_norm);
  for (auto& group : opt_->param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  opt_->step();
  opt_->zero_grad();
  if (!ema_.empty()) {
    torch::NoGradGuard ng;
    ++ema_updates_;
    const double decay = ema_warmup_ ? EmaWarmupDecay(ema_updates_, *ema_decay_) : *ema_decay_;
    for (size_t i = 0; i < params_.size(); ++i)
      ema_[i].mul_(decay).add_(params_[i].detach(), 1.0 - decay);
  }
}

absl::Status ParamTrainer::Save(const std::string& checkpoint_dir, int64_t step,
                                const nlohmann::json& extra) {
  TrainingCheckpoint c;
  c.step = step;
  int64_t adam_step = 0;
  for (const auto& [stem, module] : parts_) {
    c.tensors[stem];
    c.tensors[OptimizerStem(stem)];
    if (!ema_.empty()) c.tensors[EmaStem(stem)];
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& stem = parts_[part_[i]].stem;
    c.tensors[stem][names_[i]] = params_[i].detach().cpu();
    auto it = opt_->state().find(params_[i].unsafeGetTensorImpl());
    if (it != opt_->state().end()) {
      auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
      c.tensors[OptimizerStem(stem)][names_[i] + ".exp_avg"] = st.exp_avg().cpu();
      c.tensors[OptimizerStem(stem)][names_[i] + ".exp_avg_sq"] = st.exp_avg_sq().cpu();
      adam_step = st.step();
    }
    if (!ema_.empty()) c.tensors[EmaStem(stem)][names_[i]] = ema_[i].cpu();
  }
  c.state = extra;
  c.state["step"] = step;
  c.state["adam_step"] = adam_step;
  if (!ema_.empty()) c.state["ema_updates"] = ema_updates_;
  return WriteCheckpoint(checkpoint_dir, c);
}

safetensors::TensorMap ParamTrainer::Weights(const std::string& stem) const {
  safetensors::TensorMap out;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (parts_[part_[i]].stem != stem) continue;
    out[names_[i]] = (ema_.empty() ? params_[i] : ema_[i]).detach().cpu().contiguous();
  }
  // Frozen parameters as they are, so the written component is whole.
  for (const auto& part : parts_) {
    if (part.stem != stem) continue;
    for (const auto& p : part.module->named_parameters())
      if (!out.contains(p.key())) out[p.key()] = p.value().detach().cpu().contiguous();
  }
  return out;
}

int64_t ParamTrainer::CheckpointBytes() const {
  int64_t n = 0;
  for (const auto& p : params_)
    n += (ema_.empty() ? 3 : 4) * p.numel() * static_cast<int64_t>(p.element_size());
  return n;
}

double LearningRate(const LoopOptions& o, int64_t step) {
  step -= o.schedule_start;
  if (o.warmup_steps > 0 && step < o.warmup_steps)
    return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.schedule == "constant") return o.lr;
  // Fraction of the post-warm-up steps done, as diffusers' get_scheduler counts them.
  const int64_t total = o.total_steps - o.schedule_start;
  const double span = static_cast<double>(std::max<int64_t>(1, total - o.warmup_steps));
  const double done = std::clamp(static_cast<double>(step - o.warmup_steps) / span, 0.0, 1.0);
  if (o.schedule == "linear") return o.lr * (1.0 - done);
  return o.lr * 0.5 * (1.0 + std::cos(M_PI * done));  // cosine
}

absl::Status SkippedSamples::Check(const StageContext& ctx, const DataLoader& loader) {
  const std::vector<std::string> problems = loader.skipped();
  for (; reported_ < problems.size(); ++reported_)
    ctx.event(StageEvent::kSampleSkipped, problems[reported_]);
  const size_t total = loader.dataset_entries();
  if (static_cast<double>(problems.size()) <=
      ctx.job.max_skipped_fraction * static_cast<double>(total))
    return absl::OkStatus();
  return absl::DataLossError(absl::StrFormat(
      "dataset %s: %d of %d samples skipped (%.1f%%), more than data.max_skipped_fraction "
      "%.4g allows; first: %s",
      ctx.job.dataset, static_cast<int>(problems.size()), static_cast<int>(total),
      100.0 * static_cast<double>(problems.size()) /
          static_cast<double>(std::max<size_t>(1, total)),
      ctx.job.max_skipped_fraction, problems.front()));
}

absl::Status RunTrainingLoop(
    StageContext& ctx, ParamTrainer& trainer, DataLoader& loader, const LoopOptions& o,
    const std::function<absl::StatusOr<torch::Tensor>(int64_t, const Batch&)>& loss_fn) {
  SkippedSamples skipped;
  RETURN_IF_ERROR(skipped.Check(ctx, loader));  // what indexing the dataset passed over
  for (int64_t step = o.start_step; step < o.total_steps; ++step) {
    if (ctx.should_stop(step)) return absl::AbortedError(absl::StrCat("stopped at step ", step));
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(Batch batch, loader.Next());
    RETURN_IF_ERROR(skipped.Check(ctx, loader));
    ASSIGN_OR_RETURN(torch::Tensor loss, loss_fn(step, batch));
    loss.backward();
    trainer.Step(LearningRate(o, step), o.max_grad_norm, *ctx.collectives);
    StageProgress pr;
    pr.step = step + 1;
    pr.total_steps = o.progress_total > 0 ? o.progress_total : o.total_steps;
    pr.loss = loss.item<double>();
    pr.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pr.samples_per_s = static_cast<double>(o.global_batch) / pr.step_time_s;
    pr.data_wait_s = batch.wait_seconds;
    if ((step + 1) % ctx.job.checkpoint_interval == 0 || step + 1 == o.total_steps) {
      // An attempt that lost its lease or was superseded writes nothing more.
      if (ctx.fenced())
        return absl::AbortedError(absl::StrCat("stopped before the checkpoint of step ", step + 1));
      const auto c0 = std::chrono::steady_clock::now();
      if (ctx.rank == 0) {
        nlohmann::json state = o.checkpoint_state;
        state["seed"] = o.seed;
        state["data_cursor"] = (step + 1) * o.global_batch;
        RETURN_IF_ERROR(trainer.Save(
            o.checkpoint_dir.empty() ? ctx.checkpoint_dir : o.checkpoint_dir, step + 1, state));
      }
      pr.checkpointed = ctx.rank == 0;
      pr.checkpoint_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
      pr.checkpoint_bytes = trainer.CheckpointBytes();
    }
    ctx.report(pr);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> InputModel(const StageContext& ctx) {
  const fs::path model(ctx.input_model.empty() ? ctx.job.model : ctx.input_model);
  if (!fs::exists(model / "model_index.json"))
    return absl::InvalidArgumentError(
        absl::StrCat("model ", model.string(), " is not a diffusers folder (no model_index.json)"));
  return model.string();
}

LoaderOptions MakeLoaderOptions(const StageContext& ctx, int64_t resolution, int64_t local_batch,
                                double caption_dropout) {
  LoaderOptions o;
  o.transform = {resolution, ctx.job.center_crop, ctx.job.random_flip, caption_dropout};
  o.local_batch = local_batch;
  o.rank = ctx.rank;
  o.world_size = ctx.world_size;
  o.seed = ctx.job.seed;
  return o;
}

absl::Status WriteModelWithComponents(const std::string& input, const std::string& out,
                                      const std::map<std::string, ComponentWeights>& replaced) {
  const fs::path in(input), dst(out);
  std::error_code ec;
  fs::create_directories(dst, ec);
  for (const auto& e : fs::directory_iterator(in, ec)) {
    const std::string name = e.path().filename().string();
    if (replaced.contains(name)) continue;
    fs::copy(e.path(), dst / name,
             fs::copy_options::recursive | fs::copy_options::overwrite_existing, ec);
    if (ec)
      return absl::InternalError(
          absl::StrCat("cannot copy ", e.path().string(), " to ", out, ": ", ec.message()));
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot read ", input, ": ", ec.message()));
  for (const auto& [component, cw] : replaced) {
    fs::create_directories(dst / component, ec);
    RETURN_IF_ERROR(WriteFileAtomic((dst / component / "config.json").string(), cw.config.dump(2)));
    RETURN_IF_ERROR(
        safetensors::Save((dst / component / WeightsFileName(component)).string(), cw.weights));
  }
  return absl::OkStatus();
}

std::string WeightsFileName(const std::string& component) {
  return component == "text_encoder" ? "model.safetensors" : "diffusion_pytorch_model.safetensors";
}

absl::StatusOr<ComponentWeights> LoadComponentWeights(const std::string& model,
                                                      const std::string& name) {
  const fs::path dir = fs::path(model) / name;
  ComponentWeights c;
  ASSIGN_OR_RETURN(JsonConfig json, JsonConfig::Load((dir / "config.json").string()));
  c.config = json.json();
  if (name == "unet") {
    ASSIGN_OR_RETURN(auto m, LoadUNet(dir.string(), false));
    c.weights = StateDict(*m);
  } else if (name == "vae") {
    ASSIGN_OR_RETURN(auto m, LoadVAE(dir.string(), false));
    c.weights = StateDict(*m);
  } else if (name == "text_encoder") {
    ASSIGN_OR_RETURN(auto m, LoadCLIPTextModel(dir.string(), false));
    c.weights = StateDict(*m);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown component \"", name, "\""));
  }
  return c;
}

absl::Status CheckComponentLoads(const std::string& name, const ComponentWeights& c,
                                 const std::string& origin) {
  const JsonConfig json = JsonConfig::FromJson(c.config, origin);
  if (name == "unet") {
    ASSIGN_OR_RETURN(UNetConfig cfg, UNetConfig::FromJson(json));
    UNet2DConditionModel m(cfg);
    return LoadStateDict(*m, c.weights, origin, origin);
  }
  if (name == "vae") {
    ASSIGN_OR_RETURN(VAEConfig cfg, VAEConfig::FromJson(json));
    AutoencoderKL m(cfg);
    return LoadStateDict(*m, c.weights, origin, origin);
  }
  if (name == "text_encoder") {
    ASSIGN_OR_RETURN(CLIPTextConfig cfg, CLIPTextConfig::FromJson(json));
    CLIPTextModel m(cfg);
    return LoadStateDict(*m, c.weights, origin, origin);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown component \"", name, "\""));
}

AutocastGuard::AutocastGuard(const std::string& mixed_precision, const torch::Device& device)
    : on_(mixed_precision == "bf16" && device.is_cuda()) {
  if (!on_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
}

AutocastGuard::~AutocastGuard() {
  if (!on_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, false);
  at::autocast::clear_cache();
}

absl::StatusOr<StableDiffusion> LoadForTraining(const StageContext& ctx,
                                                StableDiffusion::LoadOptions what) {
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  what.device = torch::kCPU;
  what.dtype = torch::kFloat32;
  what.inference_layout = false;
  return StableDiffusion::Load(input, what);
}

absl::StatusOr<TrainedSteps> RunTrainingSteps(StageContext& ctx, const TrainingPlan& plan) {
  TrainedSteps run;
  ASSIGN_OR_RETURN(run.data, OpenDataset(ctx.job.dataset));
  run.trainer =
      std::make_unique<ParamTrainer>(plan.parts, plan.lr, plan.weight_decay, plan.ema_decay);
  run.trainer->set_ema_warmup(plan.ema_warmup);
  LoopOptions lo;
  lo.checkpoint_dir = plan.checkpoint_dir.empty() ? ctx.checkpoint_dir : plan.checkpoint_dir;
  ASSIGN_OR_RETURN(const int64_t resumed, run.trainer->Resume(ctx, lo.checkpoint_dir));
  lo.start_step = resumed == 0 ? plan.first_step : resumed;
  if (plan.on_start) plan.on_start(lo.start_step);
  lo.total_steps = plan.total_steps;
  lo.global_batch = plan.local_batch * ctx.world_size;
  lo.lr = plan.lr;
  lo.warmup_steps = plan.warmup_steps;
  lo.schedule = plan.lr_scheduler;
  lo.max_grad_norm = plan.max_grad_norm;
  lo.seed = ctx.job.seed;
  lo.schedule_start = plan.first_step;
  lo.progress_total = plan.progress_total;
  lo.checkpoint_state = plan.checkpoint_state;
  run.loader = MakeLoaderOptions(ctx, plan.resolution, plan.local_batch, plan.caption_dropout);
  DataLoader loader(run.data, run.loader, lo.start_step);
  RETURN_IF_ERROR(RunTrainingLoop(ctx, *run.trainer, loader, lo, plan.loss));
  return run;
}

absl::Status RunTrainingStage(StageContext& ctx, TrainingPlan plan) {
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  ASSIGN_OR_RETURN(TrainedSteps run, RunTrainingSteps(ctx, plan));
  if (ctx.rank != 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(auto replaced, plan.outputs(*run.trainer, run.data, run.loader));
  if (plan.write) return plan.write(ctx.output_dir, std::move(replaced));
  return WriteModelWithComponents(input, ctx.output_dir, replaced);
}

namespace {

// Hard links where the filesystem allows (no second copy of a model), else copies.
absl::Status LinkTree(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::create_directories(to, ec);
  for (const auto& e : fs::recursive_directory_iterator(from, ec)) {
    const fs::path dst = to / fs::relative(e.path(), from);
    if (e.is_directory()) {
      fs::create_directories(dst, ec);
      continue;
    }
    fs::remove(dst, ec);
    fs::create_hard_link(e.path(), dst, ec);
    if (ec) fs::copy_file(e.path(), dst, fs::copy_options::overwrite_existing, ec);
    if (ec)
      return absl::InternalError(absl::StrCat("cannot link or copy ", e.path().string(), " to ",
                                              dst.string(), ": ", ec.message()));
  }
  if (ec)
    return absl::InternalError(absl::StrCat("cannot read ", from.string(), ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::Status RunTransformStage(
    StageContext& ctx, const std::function<absl::Status(const std::string& dir)>& transform) {
  if (ctx.rank != 0) return absl::OkStatus();
  const fs::path root(ctx.checkpoint_dir), result = root / "result", done = root / "DONE";
  std::error_code ec;
  fs::create_directories(root, ec);
  if (fs::exists(done) && fs::is_directory(result)) {
    ctx.event(StageEvent::kInfo,
              absl::StrCat("result kept by an earlier attempt: ", result.string()));
  } else {
    const fs::path tmp = root / absl::StrCat(".tmp-result-", ::getpid());
    fs::remove_all(tmp, ec);
    fs::remove_all(result, ec);
    RETURN_IF_ERROR(transform(tmp.string()));
    fs::rename(tmp, result, ec);
    if (ec)
      return absl::InternalError(
          absl::StrCat("cannot keep ", tmp.string(), " as ", result.string(), ": ", ec.message()));
    RETURN_IF_ERROR(WriteFileAtomic(done.string(), "done\n"));
  }
  RETURN_IF_ERROR(LinkTree(result, ctx.output_dir));
  StageProgress p;
  p.step = p.total_steps = 1;
  ctx.report(p);
  return absl::OkStatus();
}

}  // namespace sd::stages
