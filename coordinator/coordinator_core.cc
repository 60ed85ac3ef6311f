#include "coordinator/coordinator_core.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/util/status_macros.h"

namespace sd::coord {

CoordinatorCore::CoordinatorCore(SchedulerOptions opts, std::unique_ptr<JobStore> store,
                                 std::string storage_root, metrics::Registry* metrics)
    : sched_(std::move(opts)),
      store_(std::move(store)),
      storage_root_(std::move(storage_root)),
      metrics_(metrics) {}

absl::Status CoordinatorCore::Recover(double now) {
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(auto jobs, store_->LoadAll());
  std::vector<std::string> ids;
  ids.reserve(jobs.size());
  for (const auto& j : jobs) ids.push_back(j.id);
  sched_.Restore(std::move(jobs), now);
  for (const auto& id : ids) PersistLocked(id);
  return absl::OkStatus();
}

void CoordinatorCore::PersistLocked(const std::string& job_id) {
  if (const JobRecord* j = sched_.job(job_id)) {
    auto s = store_->Save(*j);
    if (!s.ok()) std::fprintf(stderr, "coordinator: %s\n", std::string(s.message()).c_str());
  }
}

absl::StatusOr<std::string> CoordinatorCore::Submit(const std::string& yaml,
                                                    const std::string& origin, double now) {
  ASSIGN_OR_RETURN(JobSpec spec, ParseJobSpec(yaml, origin));
  std::lock_guard<std::mutex> lock(mu_);
  const std::string id = sched_.Submit(spec, now, yaml);
  // Persist before acknowledging: an acknowledged job survives any crash.
  RETURN_IF_ERROR(store_->Save(*sched_.job(id)));
  metrics_->CounterAdd("sd_jobs_submitted_total", "Jobs accepted by the coordinator.", {});
  return id;
}

absl::Status CoordinatorCore::Cancel(const std::string& job_id, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Action> actions;
  RETURN_IF_ERROR(sched_.Cancel(job_id, now, &actions));
  ApplyLocked(actions);
  PersistLocked(job_id);
  return absl::OkStatus();
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
                               int64_t devices, int64_t memory_bytes, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  sched_.RegisterWorker(worker, device, devices, now, memory_bytes);
  to_start_.erase(worker);
  to_abort_.erase(worker);
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

std::optional<PendingTask> CoordinatorCore::Poll(const std::string& worker) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = to_start_.find(worker);
  if (it == to_start_.end()) return std::nullopt;
  PendingTask t = it->second;
  to_start_.erase(it);
  return t;
}

absl::StatusOr<bool> CoordinatorCore::Progress(const std::string& worker, const std::string& task,
                                               int64_t step, double loss, double step_time,
                                               double samples_per_s, double now) {
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
  PersistLocked(t->job_id);
  return to_abort_.count(worker) > 0;
}

absl::Status CoordinatorCore::Finish(const std::string& worker, const std::string& task, bool ok,
                                     const std::string& error, double now) {
  std::lock_guard<std::mutex> lock(mu_);
  const TaskRecord* t = sched_.task(task);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("task ", task, " is not running"));
  const std::string job_id = t->job_id;
  std::vector<Action> actions;
  if (ok) {
    RETURN_IF_ERROR(sched_.Complete(task, worker, now));
  } else {
    RETURN_IF_ERROR(sched_.Fail(task, worker, error, now, &actions));
  }
  ApplyLocked(actions);
  PersistLocked(job_id);
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
    PendingTask p;
    p.task_id = a.task;
    p.job_id = t->job_id;
    p.stage = stage;
    p.rendezvous = t->rendezvous;
    p.backend = t->backend;
    p.job_yaml = j->yaml;
    p.rank = a.rank;
    p.world_size = static_cast<int64_t>(t->workers.size());
    const std::filesystem::path root = std::filesystem::path(storage_root_) / t->job_id;
    p.checkpoint_dir = (root / "checkpoints" / stage).string();
    p.output_dir = (root / stage).string();
    // Stages chain: each starts from the model the previous one wrote.
    p.input_model =
        t->stage == 0 ? j->spec.model : (root / j->stages[t->stage - 1].spec.name).string();
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
}

void CoordinatorCore::Tick(double now) {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, size_t> before;
  for (const auto& [id, j] : sched_.jobs()) before[id] = j.events.size();
  auto actions = sched_.Tick(now);
  ApplyLocked(actions);
  for (const auto& [id, j] : sched_.jobs()) {
    if (before[id] != j.events.size()) PersistLocked(id);
  }
  UpdateGaugesLocked(now);
}

}  // namespace sd::coord
