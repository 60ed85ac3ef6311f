#pragma once
// What every training stage shares: AdamW over named parameters with optional
// EMA, checkpoints holding weights, optimizer moments and EMA (resumed exactly),
// the step loop with warm-up, clipping, data-parallel gradient averaging,
// progress reports and periodic checkpoints, and writing the result model.
#include <torch/torch.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/data/dataset.h"
#include "sd/io/safetensors.h"
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

  // Restores from the newest valid checkpoint in ctx.checkpoint_dir; returns the
  // step to start from (0 when there is none).
  absl::StatusOr<int64_t> Resume(const std::string& checkpoint_dir);
  // After loss.backward(): average gradients across ranks, clip, set lr, step, EMA.
  void Step(double lr, double max_grad_norm,
            const std::function<void(std::vector<torch::Tensor>&)>& all_reduce_mean);
  absl::Status Save(const std::string& checkpoint_dir, int64_t step, const nlohmann::json& extra);
  // Every parameter of part `stem`, on the CPU: the trained ones as trained (the
  // EMA when one is kept), frozen ones as they are.
  safetensors::TensorMap Weights(const std::string& stem) const;
  int64_t CheckpointBytes() const;

 private:
  std::vector<TrainedPart> parts_;
  // Per parameter: its part's index into parts_, its name within the part.
  std::vector<size_t> part_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> params_, ema_;
  std::optional<double> ema_decay_;
  std::unique_ptr<torch::optim::AdamW> opt_;
};

struct LoopOptions {
  int64_t start_step = 0;
  int64_t total_steps = 0;
  int64_t global_batch = 1;
  double lr = 1e-4;
  int64_t warmup_steps = 0;           // linear warm-up from lr/warmup to lr
  std::string schedule = "constant";  // after warm-up: constant, cosine or linear decay to 0
  double max_grad_norm = 1.0;
  int64_t seed = 0;
};

// The learning rate of `step` (0-based) under o's warm-up and schedule.
double LearningRate(const LoopOptions& o, int64_t step);

// Runs steps [start_step, total_steps): takes the step's batch from `loader`,
// loss_fn(step, batch) computes the local loss, then the trainer steps;
// checkpoints every job.checkpoint_interval and at the end.
absl::Status RunTrainingLoop(
    StageContext& ctx, ParamTrainer& trainer, DataLoader& loader, const LoopOptions& o,
    const std::function<absl::StatusOr<torch::Tensor>(int64_t, const Batch&)>& loss_fn);

// The checks every training stage makes on its inputs: a dataset is named and
// the model it starts from (ctx.input_model, else job.model) is a diffusers folder.
absl::Status RequireDataset(const JobSpec& job, const std::string& stage);
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

}  // namespace sd::stages
