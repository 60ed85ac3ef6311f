#pragma once
// The coordinator's policy as a plain state machine: no sockets, no threads, no
// clock of its own (callers pass `now`). The gRPC services feed it events and carry
// out the actions it returns, so every scheduling rule is unit-testable.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/job_spec.h"

namespace sd::coord {

enum class JobState { kQueued, kRunning, kSucceeded, kFailed, kCancelled };
enum class StageState { kPending, kRunning, kSucceeded, kFailed, kCancelled };
const char* Name(JobState s);
const char* Name(StageState s);

struct WorkerRecord {
  std::string id;
  std::string device;  // "cpu" or "cuda"
  int64_t device_count = 0;
  int64_t memory_bytes = 0;
  double last_heartbeat = 0;
  std::string task;  // task it runs, empty when idle
  bool alive = true;
};

struct TaskRecord {
  std::string id;  // job/stage/attempt
  std::string job_id;
  size_t stage = 0;
  int64_t attempt = 0;
  std::vector<std::string> workers;  // rank i = workers[i]
  std::string rendezvous;            // host:port of the TCPStore rank 0 serves
  std::string backend;               // c10d backend: "nccl" when every rank is a CUDA worker
  std::vector<bool> done;
};

struct StageRecord {
  StageSpec spec;
  StageState state = StageState::kPending;
  int64_t restarts = 0;
  int64_t step = 0;
  double loss = 0;
  std::string task;
};

struct JobRecord {
  std::string id;
  std::string yaml;  // the submitted job.yaml text, kept for the store and the workers
  JobSpec spec;
  JobState state = JobState::kQueued;
  std::vector<StageRecord> stages;
  std::vector<std::string> events;
};

// What the transport must do.
struct Action {
  enum Kind { kStartTask, kAbortTask } kind;
  std::string worker;
  std::string task;
  int64_t rank = 0;
};

struct SchedulerOptions {
  double heartbeat_timeout_s = 10;
  std::string rendezvous_host = "127.0.0.1";
  int64_t rendezvous_base_port = 29500;
};

class Scheduler {
 public:
  explicit Scheduler(SchedulerOptions options) : opt_(std::move(options)) {}

  std::string Submit(const JobSpec& spec, double now, const std::string& yaml = "");
  // After a coordinator restart: jobs from the store. Stages that were running
  // go back to pending (their workers re-register and resume from checkpoints);
  // this does not count as a restart of the stage.
  void Restore(std::vector<JobRecord> jobs, double now);
  absl::Status Cancel(const std::string& job_id, double now, std::vector<Action>* actions);

  void RegisterWorker(const std::string& id, const std::string& device, int64_t device_count,
                      double now, int64_t memory_bytes = 0);
  absl::Status Heartbeat(const std::string& id, double now);

  absl::Status Progress(const std::string& task, const std::string& worker, int64_t step,
                        double loss);
  // A rank finished; the stage succeeds when every rank has.
  absl::Status Complete(const std::string& task, const std::string& worker, double now);
  // A rank failed: the whole task is aborted, and the stage restarts from its
  // latest checkpoint unless it has used up max_restarts.
  absl::Status Fail(const std::string& task, const std::string& worker, const std::string& reason,
                    double now, std::vector<Action>* actions);

  // Expires workers whose heartbeat is older than the timeout (their tasks fail
  // and restart), then assigns runnable stages to idle workers, oldest job first.
  std::vector<Action> Tick(double now);

  const std::map<std::string, JobRecord>& jobs() const { return jobs_; }
  const std::map<std::string, WorkerRecord>& workers() const { return workers_; }
  const TaskRecord* task(const std::string& id) const;
  const JobRecord* job(const std::string& id) const;

 private:
  void Event(JobRecord& job, double now, const std::string& what);
  void AbortTask(const std::string& task_id, std::vector<Action>* actions);
  void FailTask(const std::string& task_id, const std::string& reason, double now,
                std::vector<Action>* actions);

  SchedulerOptions opt_;
  std::map<std::string, JobRecord> jobs_;
  std::vector<std::string> job_order_;
  std::map<std::string, WorkerRecord> workers_;
  std::map<std::string, TaskRecord> tasks_;
  int64_t next_job_ = 1;
  int64_t next_port_ = 0;
};

}  // namespace sd::coord
