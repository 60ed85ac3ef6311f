#pragma once
// What every training stage shares: AdamW over named parameters with optional
// EMA, checkpoints holding weights, optimizer moments and EMA (resumed exactly),
// the step loop with warm-up, clipping, data-parallel gradient averaging,
// progress reports and periodic checkpoints, and writing the result model.
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/data/dataset.h"
#include "sd/io/safetensors.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/train/checkpoint.h"
#include "stages/stage.h"

namespace sd::stages {

// One trained component: its name in checkpoints and in the model folder
// ("unet", "text_encoder", "vae") and the module whose trainable parameters it holds.
struct TrainedPart {
  std::string stem;
  const torch::nn::Module* module;
};

class ParamTrainer {
 public:
  // One AdamW over every trainable parameter of `parts` (one learning rate).
  ParamTrainer(const std::vector<TrainedPart>& parts, double lr, double weight_decay,
               std::optional<double> ema_decay);
  ParamTrainer(std::string stem, const torch::nn::Module& module, double lr, double weight_decay,
               std::optional<double> ema_decay)
      : ParamTrainer({{std::move(stem), &module}}, lr, weight_decay, ema_decay) {}
  // diffusers' EMA warm-up: update n uses min(ema_decay, 1 - n^(-2/3)) (the first
  // update copies the weights), so a short run's EMA is not its initial weights.
  void set_ema_warmup(bool on) { ema_warmup_ = on; }

  struct ResumeOptions {
    bool allow_restart_from_zero = false;  // when checkpoints exist but none is usable
    bool remove_unfinished = true;         // delete .tmp-step-* left by a killed writer
    std::function<void(StageEvent, const std::string&)> event;  // rejected checkpoints, ...
  };
  // Restores from the newest usable checkpoint in `checkpoint_dir`, passing over
  // (and reporting) corrupt or incomplete ones; returns the step to start from (0
  // when there is none). DataLoss when checkpoints exist but none is usable,
  // unless o.allow_restart_from_zero.
  absl::StatusOr<int64_t> Resume(const std::string& checkpoint_dir, const ResumeOptions& o);
  absl::StatusOr<int64_t> Resume(const std::string& checkpoint_dir) {
    return Resume(checkpoint_dir, ResumeOptions{});
  }
  // As a stage resumes: the job's allow_restart_from_zero, events from rank 0.
  absl::StatusOr<int64_t> Resume(const StageContext& ctx) {
    return Resume(ctx, ctx.checkpoint_dir);
  }
  absl::StatusOr<int64_t> Resume(const StageContext& ctx, const std::string& checkpoint_dir);
  // After loss.backward(): average gradients across ranks, clip, set lr, step, EMA.
  void Step(double lr, double max_grad_norm, Collectives& collectives);
  absl::Status Save(const std::string& checkpoint_dir, int64_t step, const nlohmann::json& extra);
  // Every parameter of part `stem`, on the CPU: the trained ones as trained (the
  // EMA when one is kept), frozen ones as they are.
  safetensors::TensorMap Weights(const std::string& stem) const;
  int64_t CheckpointBytes() const;

 private:
  // Whether `c` holds everything Resume restores, each tensor in the model's shape.
  absl::Status Usable(const TrainingCheckpoint& c) const;

  std::vector<TrainedPart> parts_;
  // Per parameter: its part's index into parts_, its name within the part.
  std::vector<size_t> part_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> params_, ema_;
  std::optional<double> ema_decay_;
  bool ema_warmup_ = false;
  int64_t ema_updates_ = 0;
  std::unique_ptr<torch::optim::AdamW> opt_;
};

// The decay of EMA update `update` (1-based) under diffusers' warm-up
// (EMAModel with use_ema_warmup, inv_gamma 1, power 2/3).
double EmaWarmupDecay(int64_t update, double ema_decay);

struct LoopOptions {
  int64_t start_step = 0;
  int64_t total_steps = 0;
  int64_t global_batch = 1;
  double lr = 1e-4;
  int64_t warmup_steps = 0;           // linear warm-up from lr/warmup to lr
  std::string schedule = "constant";  // after warm-up: constant, cosine or linear decay to 0
  double max_grad_norm = 1.0;
  int64_t seed = 0;
  int64_t schedule_start = 0;  // the step warm-up and schedule count from (a phase's first)
  int64_t progress_total = 0;  // the stage's total in progress reports; 0: total_steps
  std::string checkpoint_dir;  // empty: ctx.checkpoint_dir
  nlohmann::json checkpoint_state = nlohmann::json::object();  // more state in each checkpoint
};

// The learning rate of `step` (0-based) under o's warm-up and schedule.
double LearningRate(const LoopOptions& o, int64_t step);

// Reports each skipped sample once (event log, metric) and fails the stage with
// DataLoss when more than job.max_skipped_fraction of the dataset was skipped.
class SkippedSamples {
 public:
  absl::Status Check(const StageContext& ctx, const DataLoader& loader);

 private:
  size_t reported_ = 0;
};

// Runs steps [start_step, total_steps): takes the step's batch from `loader`,
// loss_fn(step, batch) computes the local loss, then the trainer steps;
// checkpoints every job.checkpoint_interval and at the end.
absl::Status RunTrainingLoop(
    StageContext& ctx, ParamTrainer& trainer, DataLoader& loader, const LoopOptions& o,
    const std::function<absl::StatusOr<torch::Tensor>(int64_t, const Batch&)>& loss_fn);

// The model a stage starts from (ctx.input_model, else job.model), which must be a
// diffusers folder.
absl::StatusOr<std::string> InputModel(const StageContext& ctx);

// The data pipeline's options for this rank, from the job's data: settings.
LoaderOptions MakeLoaderOptions(const StageContext& ctx, int64_t resolution, int64_t local_batch,
                                double caption_dropout);

struct ComponentWeights {
  nlohmann::json config;
  safetensors::TensorMap weights;
};
// Writes a diffusers folder into `out`: every component of `input` copied, then
// each component named in `replaced` written from its config and weights.
absl::Status WriteModelWithComponents(const std::string& input, const std::string& out,
                                      const std::map<std::string, ComponentWeights>& replaced);

// The weights file of a diffusers component: transformers' name for the text
// encoder, diffusers' for the rest.
std::string WeightsFileName(const std::string& component);

// Component `name` (unet, vae or text_encoder) of the diffusers folder `model`:
// its config.json and its weights read through the component's own loader (old
// names mapped, shards joined), under the names this project writes.
absl::StatusOr<ComponentWeights> LoadComponentWeights(const std::string& model,
                                                      const std::string& name);
// Loads `c` into a fresh model of its kind, as every reader will, so that a
// transform never writes a component that does not load; `origin` names it in
// errors ("pruned unet").
absl::Status CheckComponentLoads(const std::string& name, const ComponentWeights& c,
                                 const std::string& origin);

// bf16 autocast on CUDA for a scope (matmuls and convolutions in bf16; weights,
// optimizer and loss stay fp32), switched off again however the scope is left.
class AutocastGuard {
 public:
  AutocastGuard(const std::string& mixed_precision, const torch::Device& device);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_;
};

// The training-stage helper. A stage loads its model (LoadForTraining), says what
// it trains, how its loss is computed and what it writes; RunTrainingStage does the
// rest: the dataset and its loader, AdamW (and EMA), resume from the newest usable
// checkpoint, warm-up and schedule, clipping, data-parallel averaging, periodic
// checkpoints, progress, and on rank 0 the result model in ctx.output_dir.
struct TrainingPlan {
  std::vector<TrainedPart> parts;
  double lr = 1e-4;
  double weight_decay = 1e-2;
  std::optional<double> ema_decay;
  int64_t total_steps = 0;
  int64_t warmup_steps = 0;
  std::string lr_scheduler = "constant";
  double max_grad_norm = 1.0;
  int64_t local_batch = 1;   // per rank
  int64_t resolution = 512;  // pixels
  double caption_dropout = 0;
  bool ema_warmup = false;  // ParamTrainer::set_ema_warmup
  // A stage of several training phases (progressive distillation) numbers its
  // steps across them: this phase runs steps [first_step, total_steps), keeps its
  // checkpoints in checkpoint_dir (empty: ctx.checkpoint_dir) with
  // checkpoint_state in each, and reports progress out of progress_total.
  int64_t first_step = 0;
  int64_t progress_total = 0;
  std::string checkpoint_dir;
  nlohmann::json checkpoint_state = nlohmann::json::object();
  // After resuming, before the first step, with the step it starts from.
  std::function<void(int64_t start_step)> on_start;
  // The local loss of one step (the helper backpropagates and steps).
  std::function<absl::StatusOr<torch::Tensor>(int64_t step, const Batch& batch)> loss;
  // Rank 0, after the last step: the components that replace the input model's.
  std::function<absl::StatusOr<std::map<std::string, ComponentWeights>>(
      ParamTrainer& trainer, const std::shared_ptr<const CaptionedSource>& data,
      const LoaderOptions& loader)>
      outputs;
  // How rank 0 writes them into the output folder; default WriteModelWithComponents
  // over the input model.
  std::function<absl::Status(const std::string& out, std::map<std::string, ComponentWeights>)>
      write;
};
absl::Status RunTrainingStage(StageContext& ctx, TrainingPlan plan);

// The steps of a plan without the result (a phase of a multi-phase stage): every
// rank returns its trainer after the last step, with the data it read.
struct TrainedSteps {
  std::unique_ptr<ParamTrainer> trainer;
  std::shared_ptr<const CaptionedSource> data;
  LoaderOptions loader;
};
absl::StatusOr<TrainedSteps> RunTrainingSteps(StageContext& ctx, const TrainingPlan& plan);

// The stage's input model through StableDiffusion::Load, in the training layout
// (no fused projections), on the CPU; `what` says which components to load.
absl::StatusOr<StableDiffusion> LoadForTraining(const StageContext& ctx,
                                                StableDiffusion::LoadOptions what);

// The transform-stage helper, for load -> transform -> write stages (init; prune,
// quantize, export, report). Rank 0 runs `transform(dir)`, which writes the
// result into a fresh folder; the helper keeps it under ctx.checkpoint_dir with a
// done marker, then links it into ctx.output_dir. An attempt that finds the
// marker (its predecessor finished, its result was not yet published) links the
// kept result instead of computing it again; a transform cut short leaves no
// marker and is redone.
absl::Status RunTransformStage(
    StageContext& ctx, const std::function<absl::Status(const std::string& dir)>& transform);

}  // namespace sd::stages
