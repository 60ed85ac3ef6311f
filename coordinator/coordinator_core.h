#pragma once
// The coordinator's state behind one lock: the scheduler (policy), the job store
// (durability) and the actions waiting for workers to pick them up. The gRPC
// services are thin adapters over this class.
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "common/task.h"
#include "coordinator/job_scheduler.h"
#include "coordinator/job_store.h"

namespace sd::coord {

// Where a job's files live under the storage root. Each attempt writes its model
// into a folder of its own; only the coordinator, for the current attempt, renames
// it to the stage's folder, so a stale attempt can never replace a result.
struct JobPaths {
  std::filesystem::path root;  // <storage>/<job id>
  std::filesystem::path Stage(const std::string& stage) const { return root / stage; }
  std::filesystem::path Checkpoints(const std::string& stage) const {
    return root / "checkpoints" / stage;
  }
  std::filesystem::path Attempt(const std::string& stage, int64_t attempt) const;
  // What a worker's crash handler writes (signal, task, last log lines).
  std::filesystem::path CrashReport(const std::string& stage, int64_t attempt, int64_t rank) const;
  std::filesystem::path Artifacts() const { return root / "artifacts"; }
};

class CoordinatorCore {
 public:
  CoordinatorCore(JobSchedulerOptions opts, std::unique_ptr<JobStore> store,
                  std::string storage_root, metrics::Registry* metrics);
  absl::Status Recover(double now);

  absl::StatusOr<std::string> Submit(const std::string& yaml, const std::string& origin,
                                     double now);
  absl::Status Cancel(const std::string& job_id, double now);
  absl::Status Resume(const std::string& job_id, double now);
  absl::StatusOr<JobRecord> GetJob(const std::string& job_id) const;
  std::vector<JobRecord> ListJobs() const;
  std::vector<WorkerRecord> ListWorkers() const;

  // `running_task`/`rank`: what the worker says it still runs (empty: nothing).
  void Register(const std::string& worker, const std::string& device, int64_t devices,
                int64_t memory_bytes, const std::string& metrics_address,
                const std::string& running_task, int64_t rank, double now);
  // Returns the task to abort, if any.
  absl::StatusOr<std::string> Heartbeat(const std::string& worker, double now);
  std::optional<TaskAssignment> Poll(const std::string& worker);
  // NotFound: the worker is not registered (it registers again and retries);
  // FailedPrecondition: the attempt is not current and must stop.
  absl::StatusOr<bool> Progress(const std::string& worker, const std::string& task, int64_t step,
                                double loss, double step_time, double samples_per_s,
                                const std::vector<std::string>& log_lines, double now);
  // Idempotent per attempt; acknowledged (OK) only once the outcome is stored.
  absl::Status Finish(const std::string& worker, const std::string& task, bool ok,
                      const std::string& error, absl::StatusCode code,
                      const std::vector<std::string>& log_lines, double now);
  void Tick(double now);

 private:
  void ApplyLocked(const std::vector<Action>& actions);
  absl::Status PersistLocked(const std::string& job_id,
                             JobStore::Durability d = JobStore::Durability::kSynced);
  JobPaths PathsOf(const std::string& job_id) const;
  // Per job, how many events it has: what changed since is persisted by
  // PersistChangedLocked.
  std::map<std::string, size_t> EventCountsLocked() const;
  void PersistChangedLocked(const std::map<std::string, size_t>& before);
  void LogLinesLocked(const std::string& task, const std::string& worker,
                      const std::vector<std::string>& lines, double now);
  void UpdateGaugesLocked(double now);

  mutable std::mutex mu_;
  JobScheduler sched_;
  std::unique_ptr<JobStore> store_;
  std::string storage_root_;
  metrics::Registry* metrics_;
  std::map<std::string, TaskAssignment> to_start_;  // worker -> task
  std::map<std::string, std::string> to_abort_;     // worker -> task
  // (job, stage) pairs with per-job gauges on /metrics; removed when the job ends.
  std::set<std::pair<std::string, std::string>> stage_gauges_;
};

}  // namespace sd::coord
