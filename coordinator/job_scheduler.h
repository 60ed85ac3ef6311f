#pragma once
// The coordinator's policy as a plain state machine: no sockets, no threads, no
// clock of its own (callers pass `now`). The gRPC services feed it events and carry
// out the actions it returns, so every scheduling rule is unit-testable.
//
// Its promises (docs/operations.md): every attempt of a stage has an id that is
// never reused (the stage's durable attempt counter); only workers of the current
// attempt may report or finish; a stage is not started again while any live
// worker may still be running an older attempt of it (an aborted worker stays
// busy until it says it stopped or its heartbeats expire); after a coordinator
// restart, workers that report what they run are adopted, never duplicated.
#include <cstdint>
#include <functional>
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
// Succeeded, failed or cancelled: nothing more happens to it unless it is resumed.
inline bool Ended(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}
const char* Name(StageState s);

// Whether restarting a stage can help: a missing model, a bad config or a full
// disk fail the same way every time, so they end the job at once (the user fixes
// the cause and runs `sdctl resume`); a lost worker or peer is retried with back-off.
enum class Failure { kTransient, kPermanent };
Failure Classify(absl::StatusCode code);

struct WorkerRecord {
  std::string id;
  std::string device;  // "cpu" or "cuda"
  int64_t device_count = 0;
  int64_t memory_bytes = 0;
  double last_heartbeat = 0;
  std::string metrics_address;  // host:port of its /metrics (for operators; not policy)
  std::string task;             // task it runs, empty when idle
  bool stopping = false;        // told to abort `task`: busy until it finishes or expires
  bool alive = true;
};

struct TaskRecord {
  std::string id;  // job/stage/attempt
  std::string job_id;
  size_t stage = 0;
  int64_t attempt = 0;
  std::vector<std::string> workers;  // rank i = workers[i]; "" while a rank is not back yet
  std::string rendezvous;            // host:port of the TCPStore rank 0 serves
  std::string backend;               // c10d backend: "nccl" when every rank is a CUDA worker
  std::vector<bool> done;
  // > 0: restored after a coordinator restart; the attempt is adopted when every
  // rank re-registers saying it runs it, and given up at this time otherwise.
  double adopt_deadline = 0;
};

struct StageRecord {
  StageSpec spec;
  StageState state = StageState::kPending;
  int64_t restarts = 0;
  int64_t attempts = 0;  // attempts ever started; the next attempt's number (durable)
  int64_t step = 0;
  double loss = 0;
  double not_before = 0;  // restart back-off: not started again before this time
  std::string task;
  std::string error;  // why the stage last failed
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

struct JobSchedulerOptions {
  double heartbeat_timeout_s = 10;
  std::string rendezvous_host = "127.0.0.1";
  int64_t rendezvous_base_port = 29500;
  // Restart k of a stage waits min(restart_backoff_max_s, restart_backoff_s * 2^(k-1)).
  double restart_backoff_s = 2;
  double restart_backoff_max_s = 300;
};

class JobScheduler {
 public:
  explicit JobScheduler(JobSchedulerOptions options) : opt_(std::move(options)) {}

  // A new job record (not yet scheduled): the caller stores it durably, then Add()s it.
  static JobRecord NewJob(const std::string& id, const JobSpec& spec, const std::string& yaml,
                          double now);
  void Add(JobRecord job);
  // NewJob + Add with the next id of this scheduler (tests; the coordinator
  // allocates ids durably in its store).
  std::string Submit(const JobSpec& spec, double now, const std::string& yaml = "");
  // After a coordinator restart: jobs from the store. A stage that was running
  // waits up to one heartbeat timeout for its workers to re-register with its
  // attempt (then it is adopted and goes on); otherwise it goes back to pending
  // and resumes from its latest checkpoint. Neither counts as a restart.
  void Restore(std::vector<JobRecord> jobs, double now);
  absl::Status Cancel(const std::string& job_id, double now, std::vector<Action>* actions);
  // A failed or cancelled job runs again: its unfinished stages go back to
  // pending with their restarts reset, and resume from their newest valid checkpoint.
  absl::Status Resume(const std::string& job_id, double now);

  // `running_task` (with `rank`) is what the worker says it is still running: the
  // current attempt is adopted, a stale one is told to stop. A worker that comes
  // back running nothing has lost whatever it was given (its process restarted).
  std::vector<Action> RegisterWorker(const std::string& id, const std::string& device,
                                     int64_t device_count, double now, int64_t memory_bytes = 0,
                                     const std::string& running_task = "", int64_t rank = 0);
  absl::Status Heartbeat(const std::string& id, double now);
  void SetMetricsAddress(const std::string& id, const std::string& address);

  // FailedPrecondition: the attempt is not current (superseded, aborted or
  // unknown); the worker must stop it.
  absl::Status Progress(const std::string& task, const std::string& worker, int64_t step,
                        double loss);
  // A rank finished. When it is the last one, `commit` publishes the attempt's
  // output (an error fails the attempt instead) and the stage succeeds. Idempotent:
  // finishing a rank, or a stage, twice is OK.
  absl::Status Complete(const std::string& task, const std::string& worker, double now,
                        const std::function<absl::Status()>& commit = {});
  // A rank failed: the whole task is aborted; a transient failure restarts the
  // stage from its latest checkpoint (after a back-off) unless it has used up
  // max_restarts, a permanent one fails the job.
  absl::Status Fail(const std::string& task, const std::string& worker, const std::string& reason,
                    double now, std::vector<Action>* actions, Failure kind = Failure::kTransient);

  // Expires workers whose heartbeat is older than the timeout (their tasks fail
  // and restart; `last_words(worker, task)` may say why a worker died), gives up
  // adoptions past their deadline, then assigns runnable stages to idle workers,
  // oldest job first.
  std::vector<Action> Tick(
      double now,
      const std::function<std::string(const std::string& worker, const std::string& task)>&
          last_words = {});

  // Appends a line to the job's event log (what a worker reports: skipped samples,
  // rejected checkpoints).
  void Note(const std::string& job_id, double now, const std::string& what);

  const std::map<std::string, JobRecord>& jobs() const { return jobs_; }
  const std::map<std::string, WorkerRecord>& workers() const { return workers_; }
  const TaskRecord* task(const std::string& id) const;
  const JobRecord* job(const std::string& id) const;

 private:
  void Event(JobRecord& job, double now, const std::string& what);
  void AbortTask(const std::string& task_id, std::vector<Action>* actions);
  void FailTask(const std::string& task_id, const std::string& reason, Failure kind,
                bool count_restart, double now, std::vector<Action>* actions);
  // A worker told to stop `task` says it has: it is idle again.
  bool ReleaseStopping(const std::string& worker, const std::string& task);
  // Whether a live worker may still be running some attempt of this stage.
  bool StageBusy(const std::string& job_id, const std::string& stage) const;

  JobSchedulerOptions opt_;
  std::map<std::string, JobRecord> jobs_;
  std::vector<std::string> job_order_;
  std::map<std::string, WorkerRecord> workers_;
  std::map<std::string, TaskRecord> tasks_;
  int64_t next_job_ = 1;
  int64_t next_port_ = 0;
};

// "job-000001/finetune/3" -> {job, stage, attempt}; false when malformed.
bool ParseTaskId(const std::string& id, std::string* job, std::string* stage, int64_t* attempt);

}  // namespace sd::coord
