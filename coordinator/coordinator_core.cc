#include "coordinator/coordinator_core.h"

#include "stages/catalog.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::coord {
namespace fs = std::filesystem;
namespace {

// Names the attempt a published stage folder came from, so a Finish retried after
// the rename (the coordinator died in between) is recognised as already done.
constexpr char kAttemptMarker[] = ".sdcompress-attempt";

// Publishes an attempt's model folder as the stage's result: one rename.
absl::Status CommitOutput(const JobPaths& paths, const std::string& stage, int64_t attempt,
                          const std::string& task_id) {
  const fs::path from = paths.Attempt(stage, attempt), to = paths.Stage(stage);
  std::error_code ec;
  if (!fs::exists(from, ec)) {
    auto marker = ReadFile((to / kAttemptMarker).string());
    if (marker.ok() && *marker == task_id) return absl::OkStatus();
    return absl::InternalError(
        absl::StrCat(task_id, " finished but wrote no output at ", from.string()));
  }
  RETURN_IF_ERROR(WriteFileAtomic((from / kAttemptMarker).string(), task_id));
  fs::remove_all(to, ec);  // left by a build that wrote results in place
  fs::rename(from, to, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("cannot publish ", from.string(), " as ", to.string(), ": ", ec.message()));
  FsyncDir(paths.root.string());
  // Folders of attempts that did not succeed are of no further use.
  const std::string prefix = stage + "-";
  for (const auto& e : fs::directory_iterator(paths.root / "attempts", ec)) {
    if (e.is_directory() && e.path().filename().string().rfind(prefix, 0) == 0)
      fs::remove_all(e.path(), ec);
  }
  return absl::OkStatus();
}

}  // namespace

fs::path JobPaths::Attempt(const std::string& stage, int64_t attempt) const {
  return root / "attempts" / absl::StrCat(stage, "-", attempt);
}

fs::path JobPaths::CrashReport(const std::string& stage, int64_t attempt, int64_t rank) const {
  return root / "attempts" / absl::StrCat(stage, "-", attempt, ".rank", rank, ".crash");
}

CoordinatorCore::CoordinatorCore(JobSchedulerOptions opts, std::unique_ptr<JobStore> store,
                                 std::string storage_root, metrics::Registry* metrics)
    : sched_(std::move(opts)),
      store_(std::move(store)),
      storage_root_(std::move(storage_root)),
      metrics_(metrics) {}

std::map<std::string, size_t> CoordinatorCore::EventCountsLocked() const {
  std::map<std::string, size_t> counts;
  for (const auto& [id, j] : sched_.jobs()) counts[id] = j.events.size();
  return counts;
}

void CoordinatorCore::PersistChangedLocked(const std::map<std::string, size_t>& before) {
  // Every change the scheduler makes to a job logs an event: new events, new state.
  for (const auto& [id, j] : sched_.jobs()) {
    auto it = before.find(id);
    if (it == before.end() || it->second != j.events.size()) PersistLocked(id).IgnoreError();
  }
}

JobPaths CoordinatorCore::PathsOf(const std::string& job_id) const {
  return {fs::path(storage_root_) / job_id};
}

absl::Status CoordinatorCore::Recover(double now) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(auto jobs, store_->LoadAll(now));
  std::vector<std::string> ids;
  ids.reserve(jobs.size());
  for (const auto& j : jobs) ids.push_back(j.id);
  sched_.Restore(std::move(jobs), now);
  for (const auto& id : ids) PersistLocked(id).IgnoreError();
  return absl::OkStatus();
}

absl::Status CoordinatorCore::PersistLocked(const std::string& job_id, JobStore::Durability d) {
  const JobRecord* j = sched_.job(job_id);
  if (j == nullptr) return absl::OkStatus();
  absl::Status s = store_->Save(*j, d);
  if (!s.ok()) std::fprintf(stderr, "coordinator: %s\n", std::string(s.message()).c_str());
  return s;
}

absl::StatusOr<std::string> CoordinatorCore::Submit(const std::string& yaml,
                                                    const std::string& origin, double now) {
  ASSIGN_OR_RETURN(JobSpec spec, ParseJobSpec(yaml, origin));
  std::lock_guard<std::mutex> lock(mu_);
  // The id is taken from the store's counter (never handed out twice) and its run
  // folder is created here, fresh: a job never finds another job's checkpoints.
  std::string id;
  for (int tries = 0; id.empty(); ++tries) {
    ASSIGN_OR_RETURN(const int64_t n, store_->AllocateJobNumber());
    const std::string candidate = absl::StrFormat("job-%06d", n);
    std::error_code ec;
    fs::create_directories(storage_root_, ec);
    if (fs::create_directory(PathsOf(candidate).root, ec)) {
      id = candidate;
    } else if (ec) {
      return absl::UnavailableError(absl::StrCat(
          "cannot create the run folder ", PathsOf(candidate).root.string(), ": ", ec.message()));
    } else {
      std::fprintf(stderr, "coordinator: %s already exists (not from this store); skipping %s\n",
                   PathsOf(candidate).root.c_str(), candidate.c_str());
      if (tries > 1000) return absl::InternalError("no free job id: every run folder exists");
    }
  }
  JobRecord job = JobScheduler::NewJob(id, spec, yaml, now);
  // Stored before it is acknowledged or scheduled: a job the store refused never runs.
  if (absl::Status s = store_->Save(job); !s.ok()) {
    std::error_code ec;
    fs::remove_all(PathsOf(id).root, ec);
    return absl::UnavailableError(
        absl::StrCat("the job was not stored, so it will not run: ", s.message()));
  }
  sched_.Add(std::move(job));
  metrics_->CounterAdd("sd_jobs_submitted_total", "Jobs accepted by the coordinator.", {});
  return id;
}

absl::Status CoordinatorCore::Cancel(const std::string& job_id, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Action> actions;
  RETURN_IF_ERROR(sched_.Cancel(job_id, now, &actions));
  ApplyLocked(actions);
  return PersistLocked(job_id);
}

absl::Status CoordinatorCore::Resume(const std::string& job_id, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(sched_.Resume(job_id, now));
  return PersistLocked(job_id);
}

absl::StatusOr<JobRecord> CoordinatorCore::GetJob(const std::string& job_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const JobRecord* j = sched_.job(job_id);
  if (j == nullptr) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  return *j;
}

std::vector<JobRecord> CoordinatorCore::ListJobs() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<JobRecord> out;
  for (const auto& [id, j] : sched_.jobs()) out.push_back(j);
  return out;
}

std::vector<WorkerRecord> CoordinatorCore::ListWorkers() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<WorkerRecord> out;
  for (const auto& [id, w] : sched_.workers()) out.push_back(w);
  return out;
}

void CoordinatorCore::Register(const std::string& worker, const std::string& device,
                               int64_t devices, int64_t memory_bytes,
                               const std::string& metrics_address, const std::string& running_task,
                               int64_t rank, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  to_start_.erase(worker);
  to_abort_.erase(worker);
  const auto before = EventCountsLocked();
  ApplyLocked(
      sched_.RegisterWorker(worker, device, devices, now, memory_bytes, running_task, rank));
  sched_.SetMetricsAddress(worker, metrics_address);
  PersistChangedLocked(before);
}

absl::StatusOr<std::string> CoordinatorCore::Heartbeat(const std::string& worker, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(sched_.Heartbeat(worker, now));
  auto it = to_abort_.find(worker);
  if (it == to_abort_.end()) return std::string();
  std::string task = it->second;
  to_abort_.erase(it);
  return task;
}

std::optional<TaskAssignment> CoordinatorCore::Poll(const std::string& worker) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = to_start_.find(worker);
  if (it == to_start_.end()) return std::nullopt;
  TaskAssignment t = it->second;
  to_start_.erase(it);
  return t;
}

void CoordinatorCore::LogLinesLocked(const std::string& task, const std::string& worker,
                                     const std::vector<std::string>& lines, double now) {
  std::string job_id, stage;
  int64_t attempt = 0;
  if (lines.empty() || !ParseTaskId(task, &job_id, &stage, &attempt)) return;
  for (const auto& l : lines) sched_.Note(job_id, now, absl::StrCat(worker, ": ", l));
}

absl::StatusOr<bool> CoordinatorCore::Progress(const std::string& worker, const std::string& task,
                                               int64_t step, double loss, double step_time,
                                               double samples_per_s,
                                               const std::vector<std::string>& log_lines,
                                               double now) {
  std::lock_guard<std::mutex> lock(mu_);
  RETURN_IF_ERROR(sched_.Heartbeat(worker, now));
  RETURN_IF_ERROR(sched_.Progress(task, worker, step, loss));
  const TaskRecord* t = sched_.task(task);
  const JobRecord* j = sched_.job(t->job_id);
  const metrics::Labels labels{{"job_id", t->job_id}, {"stage", j->stages[t->stage].spec.name}};
  metrics_->GaugeSet("sd_stage_step", "Latest training step of a running stage.", labels,
                     static_cast<double>(step));
  metrics_->GaugeSet("sd_stage_loss", "Latest training loss of a running stage.", labels, loss);
  metrics_->GaugeSet("sd_stage_samples_per_second", "Training throughput of a running stage.",
                     labels, samples_per_s);
  metrics_->HistogramObserve("sd_step_seconds", "Training step time.",
                             {{"stage", j->stages[t->stage].spec.name}}, step_time);
  stage_gauges_.emplace(t->job_id, j->stages[t->stage].spec.name);
  LogLinesLocked(task, worker, log_lines, now);
  // One report per training step: no fsync for it (docs/operations.md).
  PersistLocked(t->job_id, JobStore::Durability::kRelaxed).IgnoreError();
  return to_abort_.count(worker) > 0;
}

absl::Status CoordinatorCore::Finish(const std::string& worker, const std::string& task, bool ok,
                                     const std::string& error, absl::StatusCode code,
                                     const std::vector<std::string>& log_lines, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  // Unknown worker (the coordinator restarted): it registers again, saying what it
  // runs, and retries.
  RETURN_IF_ERROR(sched_.Heartbeat(worker, now));
  std::string job_id, stage;
  int64_t attempt = 0;
  if (!ParseTaskId(task, &job_id, &stage, &attempt))
    return absl::InvalidArgumentError(absl::StrCat("malformed task id \"", task, "\""));
  LogLinesLocked(task, worker, log_lines, now);
  std::vector<Action> actions;
  absl::Status s;
  if (ok) {
    const JobPaths paths = PathsOf(job_id);
    s = sched_.Complete(task, worker, now,
                        [&] { return CommitOutput(paths, stage, attempt, task); });
  } else {
    s = sched_.Fail(task, worker, error, now, &actions, Classify(code));
  }
  ApplyLocked(actions);
  // Acknowledged only once stored: a Finish the store missed is retried (and is
  // idempotent), so no outcome is lost to a crash here.
  absl::Status stored = PersistLocked(job_id);
  RETURN_IF_ERROR(s);
  if (!stored.ok()) return absl::UnavailableError(stored.message());
  return absl::OkStatus();
}

void CoordinatorCore::ApplyLocked(const std::vector<Action>& actions) {
  for (const auto& a : actions) {
    if (a.kind == Action::kAbortTask) {
      to_start_.erase(a.worker);
      to_abort_[a.worker] = a.task;
      continue;
    }
    const TaskRecord* t = sched_.task(a.task);
    const JobRecord* j = sched_.job(t->job_id);
    const std::string stage = j->stages[t->stage].spec.name;
    const JobPaths paths = PathsOf(t->job_id);
    TaskAssignment p;
    p.task_id = a.task;
    p.job_id = t->job_id;
    p.stage = stage;
    p.rendezvous = t->rendezvous;
    p.backend = t->backend;
    p.job_yaml = j->yaml;
    p.rank = a.rank;
    p.world_size = static_cast<int64_t>(t->workers.size());
    p.checkpoint_dir = paths.Checkpoints(stage).string();
    p.output_dir = paths.Attempt(stage, t->attempt).string();
    p.crash_report = paths.CrashReport(stage, t->attempt, a.rank).string();
    // Stages chain: each starts from the model the last model-producing stage
    // before it published (an artifact stage, such as a report, is beside the chain).
    p.input_model = j->spec.model;
    for (size_t i = t->stage; i-- > 0;) {
      const stages::StageDescriptor* d = stages::FindStage(j->stages[i].spec.name);
      if (d != nullptr && d->produces == stages::Produces::kModel) {
        p.input_model = paths.Stage(j->stages[i].spec.name).string();
        break;
      }
    }
    p.teacher_model = j->spec.model;
    p.artifacts_dir = paths.Artifacts().string();
    to_start_[a.worker] = p;
  }
}

void CoordinatorCore::UpdateGaugesLocked(double now) {
  std::map<std::string, int> by_state;
  for (const auto& [id, j] : sched_.jobs()) by_state[Name(j.state)]++;
  for (const char* s : {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}) {
    metrics_->GaugeSet("sd_jobs", "Jobs by state.", {{"state", s}}, by_state[s]);
  }
  int alive = 0, busy = 0;
  for (const auto& [id, w] : sched_.workers()) {
    alive += w.alive;
    busy += w.alive && !w.task.empty();
    metrics_->GaugeSet("sd_worker_heartbeat_age_seconds",
                       "Seconds since a worker's last heartbeat.", {{"worker", id}},
                       now - w.last_heartbeat);
  }
  metrics_->GaugeSet("sd_workers", "Registered workers.", {{"state", "alive"}}, alive);
  metrics_->GaugeSet("sd_workers", "Registered workers.", {{"state", "busy"}}, busy);
  metrics_->GaugeSet("sd_queue_depth", "Jobs waiting for workers.", {}, by_state["QUEUED"]);
  // A finished job's series would otherwise stay on /metrics for the daemon's life,
  // one set per job ever run.
  for (auto it = stage_gauges_.begin(); it != stage_gauges_.end();) {
    const JobRecord* j = sched_.job(it->first);
    const bool ended = j == nullptr || Ended(j->state);
    if (!ended) {
      ++it;
      continue;
    }
    const metrics::Labels labels{{"job_id", it->first}, {"stage", it->second}};
    for (const char* g : {"sd_stage_step", "sd_stage_loss", "sd_stage_samples_per_second"})
      metrics_->Remove(g, labels);
    it = stage_gauges_.erase(it);
  }
}

void CoordinatorCore::Tick(double now) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto before = EventCountsLocked();
  // A worker that died of a signal left its last words on shared storage.
  auto last_words = [this](const std::string& worker, const std::string& task) -> std::string {
    std::string job_id, stage;
    int64_t attempt = 0;
    const TaskRecord* t = sched_.task(task);
    if (t == nullptr || !ParseTaskId(task, &job_id, &stage, &attempt)) return "";
    for (size_t r = 0; r < t->workers.size(); ++r) {
      if (t->workers[r] != worker) continue;
      const std::string path = PathsOf(job_id).CrashReport(stage, attempt, r).string();
      auto text = ReadFile(path);
      if (!text.ok() || text->empty()) continue;
      // The first line says what happened; the backtrace stays in the file.
      return absl::StrCat("worker ", worker, " crashed: ", text->substr(0, text->find('\n')),
                          " (report: ", path, ")");
    }
    return "";
  };
  auto actions = sched_.Tick(now, last_words);
  // A started attempt's number must be durable before any worker can see it, or a
  // crash could hand the same attempt id out twice.
  PersistChangedLocked(before);
  ApplyLocked(actions);
  UpdateGaugesLocked(now);
}

}  // namespace sd::coord
