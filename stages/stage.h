#pragma once
// The one interface every compression stage implements. What the control plane
// knows of a stage (options, validation, progress total) is its descriptor
// (stages/catalog.h, no LibTorch); this is the part that runs on a worker.
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "common/task.h"

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

// What the ranks of a data-parallel stage do together. This base class is the
// world of one rank (every call is the identity); worker/data_parallel.h is c10d's.
class Collectives {
 public:
  virtual ~Collectives() = default;
  // tensors[i] = the mean of tensors[i] over all ranks (undefined ones skipped).
  virtual void AllReduceMean(std::vector<torch::Tensor>& tensors) {}
  // Every rank's tensors become those of rank `root`.
  virtual void Broadcast(std::vector<torch::Tensor>& tensors, int64_t root) {}
  virtual void Barrier() {}
  // Each rank's `t` (same shape on every rank), in rank order.
  virtual std::vector<torch::Tensor> AllGather(const torch::Tensor& t) { return {t}; }
};

struct StageContext {
  JobSpec job;
  int64_t rank = 0;
  int64_t world_size = 1;
  std::string checkpoint_dir;  // shared storage for this stage's checkpoints
  std::string output_dir;      // the stage's result (a diffusers folder, or its artifact)
  std::string input_model;     // the model to start from: the previous stage's result, or job.model
  std::string teacher_model;   // the job's model, for stages that distill from it
  std::string artifacts_dir;   // the job's folder for artifacts beside the chain (reports, ...)
  torch::Device device = torch::kCPU;
  std::shared_ptr<Collectives> collectives = std::make_shared<Collectives>();
  std::function<void(const StageProgress&)> report = [](const StageProgress&) {};
  // Polled between steps; true stops the stage cleanly (abort, a lost lease, or
  // test interruption).
  std::function<bool(int64_t step)> should_stop = [](int64_t) { return false; };
  // True once this attempt may write nothing more (superseded, aborted, or its
  // lease on the coordinator lapsed): checked before every checkpoint.
  std::function<bool()> fenced = [] { return false; };
  std::function<void(StageEvent, const std::string&)> event = [](StageEvent, const std::string&) {};

  template <typename T>
  const T& options(const std::string& stage) const {
    return job.Options<T>(stage);
  }
};

// The one way a stage's context is built from its task (the worker and
// tests/tools/sd_probe both use it): paths, rank and device. Collectives and
// callbacks are the caller's.
StageContext MakeStageContext(const TaskAssignment& task, JobSpec job);

class Stage {
 public:
  virtual ~Stage() = default;
  // Resumes from the newest valid checkpoint in ctx.checkpoint_dir, if any.
  virtual absl::Status Run(StageContext& ctx) = 0;
};

// The stage of this name in stages/catalog.inc.
absl::StatusOr<std::unique_ptr<Stage>> MakeStage(const std::string& name);

}  // namespace sd::stages
