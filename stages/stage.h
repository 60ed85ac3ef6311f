#pragma once
// The one interface every compression stage implements, so a new stage touches
// one folder: validate the job, run with checkpoint/resume, report progress.
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/job_spec.h"

namespace sd::stages {

struct StageProgress {
  int64_t step = 0;
  int64_t total_steps = 0;
  double loss = 0;
  double step_time_s = 0;
  double samples_per_s = 0;
  double data_wait_s = 0;  // time the step waited for its batch
  bool checkpointed = false;
  double checkpoint_seconds = 0;  // when checkpointed
  int64_t checkpoint_bytes = 0;
};

// What a stage tells the job's event log besides progress; the worker also counts
// each kind in its metrics.
enum class StageEvent { kInfo, kCheckpointRejected, kSampleSkipped };

struct StageContext {
  JobSpec job;
  int64_t rank = 0;
  int64_t world_size = 1;
  std::string checkpoint_dir;  // shared storage for this stage's checkpoints
  std::string output_dir;      // the stage's result (a diffusers model folder)
  std::string input_model;     // the model to start from: the previous stage's output, or job.model
  torch::Device device = torch::kCPU;
  std::function<void(const StageProgress&)> report = [](const StageProgress&) {};
  // Polled between steps; true stops the stage cleanly (abort, a lost lease, or
  // test interruption).
  std::function<bool(int64_t step)> should_stop = [](int64_t) { return false; };
  // True once this attempt may write nothing more (superseded, aborted, or its
  // lease on the coordinator lapsed): checked before every checkpoint.
  std::function<bool()> fenced = [] { return false; };
  std::function<void(StageEvent, const std::string&)> event = [](StageEvent, const std::string&) {};
  // Data-parallel gradient averaging across ranks; the identity for one worker.
  std::function<void(std::vector<torch::Tensor>& grads)> all_reduce_mean =
      [](std::vector<torch::Tensor>&) {};
};

class Stage {
 public:
  virtual ~Stage() = default;
  virtual std::string name() const = 0;
  virtual absl::Status Validate(const JobSpec& job) const = 0;
  // Resumes from the newest valid checkpoint in ctx.checkpoint_dir, if any.
  virtual absl::Status Run(StageContext& ctx) = 0;
};

absl::StatusOr<std::unique_ptr<Stage>> MakeStage(const std::string& name);

}  // namespace sd::stages
