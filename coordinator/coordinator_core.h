#pragma once
// The coordinator's state behind one lock: the scheduler (policy), the job store
// (durability) and the actions waiting for workers to pick them up. The gRPC
// services are thin adapters over this class.
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "coordinator/job_store.h"
#include "coordinator/scheduler.h"

namespace sd::coord {

struct PendingTask {
  std::string task_id, job_id, stage, rendezvous, backend, job_yaml, checkpoint_dir, output_dir,
      input_model;
  int64_t rank = 0, world_size = 1;
};

class CoordinatorCore {
 public:
  CoordinatorCore(SchedulerOptions opts, std::unique_ptr<JobStore> store, std::string storage_root,
                  metrics::Registry* metrics);
  absl::Status Recover(double now);

  absl::StatusOr<std::string> Submit(const std::string& yaml, const std::string& origin,
                                     double now);
  absl::Status Cancel(const std::string& job_id, double now);
  absl::StatusOr<JobRecord> GetJob(const std::string& job_id) const;
  std::vector<JobRecord> ListJobs() const;
  std::vector<WorkerRecord> ListWorkers() const;

  void Register(const std::string& worker, const std::string& device, int64_t devices,
                int64_t memory_bytes, double now);
  // Returns the task to abort, if any.
  absl::StatusOr<std::string> Heartbeat(const std::string& worker, double now);
  std::optional<PendingTask> Poll(const std::string& worker);
  absl::StatusOr<bool> Progress(const std::string& worker, const std::string& task, int64_t step,
                                double loss, double step_time, double samples_per_s, double now);
  absl::Status Finish(const std::string& worker, const std::string& task, bool ok,
                      const std::string& error, double now);
  void Tick(double now);

 private:
  void ApplyLocked(const std::vector<Action>& actions);
  void PersistLocked(const std::string& job_id);
  void UpdateGaugesLocked(double now);

  mutable std::mutex mu_;
  Scheduler sched_;
  std::unique_ptr<JobStore> store_;
  std::string storage_root_;
  metrics::Registry* metrics_;
  std::map<std::string, PendingTask> to_start_;  // worker -> task
  std::map<std::string, std::string> to_abort_;  // worker -> task
};

}  // namespace sd::coord
