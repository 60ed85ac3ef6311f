#include "coordinator/scheduler.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace sd::coord {

const char* Name(JobState s) {
  switch (s) {
    case JobState::kQueued:
      return "QUEUED";
    case JobState::kRunning:
      return "RUNNING";
    case JobState::kSucceeded:
      return "SUCCEEDED";
    case JobState::kFailed:
      return "FAILED";
    case JobState::kCancelled:
      return "CANCELLED";
  }
  return "?";
}

const char* Name(StageState s) {
  switch (s) {
    case StageState::kPending:
      return "PENDING";
    case StageState::kRunning:
      return "RUNNING";
    case StageState::kSucceeded:
      return "SUCCEEDED";
    case StageState::kFailed:
      return "FAILED";
    case StageState::kCancelled:
      return "CANCELLED";
  }
  return "?";
}

void Scheduler::Event(JobRecord& job, double now, const std::string& what) {
  job.events.push_back(absl::StrFormat("%.3f %s", now, what));
}

std::string Scheduler::Submit(const JobSpec& spec, double now, const std::string& yaml) {
  JobRecord job;
  job.id = absl::StrFormat("job-%06d", next_job_++);
  job.yaml = yaml;
  job.spec = spec;
  for (const auto& st : spec.stages) {
    StageRecord r;
    r.spec = st;
    job.stages.push_back(std::move(r));
  }
  Event(job, now, absl::StrCat("submitted with ", job.stages.size(), " stage(s)"));
  std::string id = job.id;
  jobs_[id] = std::move(job);
  job_order_.push_back(id);
  return id;
}

void Scheduler::Restore(std::vector<JobRecord> jobs, double now) {
  for (auto& job : jobs) {
    int64_t n = 0;
    if (sscanf(job.id.c_str(), "job-%ld", &n) == 1) next_job_ = std::max(next_job_, n + 1);
    for (auto& st : job.stages) {
      st.task.clear();
      if (st.state == StageState::kRunning) {
        st.state = StageState::kPending;
        Event(job, now,
              absl::StrCat("coordinator restarted; stage ", st.spec.name,
                           " will resume from its latest checkpoint"));
      }
    }
    const std::string id = job.id;
    if (!jobs_.count(id)) job_order_.push_back(id);
    jobs_[id] = std::move(job);
  }
  std::sort(job_order_.begin(), job_order_.end());
}

const TaskRecord* Scheduler::task(const std::string& id) const {
  auto it = tasks_.find(id);
  return it == tasks_.end() ? nullptr : &it->second;
}

const JobRecord* Scheduler::job(const std::string& id) const {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : &it->second;
}

void Scheduler::RegisterWorker(const std::string& id, const std::string& device,
                               int64_t device_count, double now, int64_t memory_bytes) {
  WorkerRecord& w = workers_[id];
  w.id = id;
  w.device = device;
  w.device_count = device_count;
  w.memory_bytes = memory_bytes;
  w.last_heartbeat = now;
  w.alive = true;
}

absl::Status Scheduler::Heartbeat(const std::string& id, double now) {
  auto it = workers_.find(id);
  if (it == workers_.end() || !it->second.alive) {
    return absl::NotFoundError(absl::StrCat("worker ", id, " is not registered; register again"));
  }
  it->second.last_heartbeat = now;
  return absl::OkStatus();
}

void Scheduler::AbortTask(const std::string& task_id, std::vector<Action>* actions) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return;
  for (size_t r = 0; r < it->second.workers.size(); ++r) {
    auto w = workers_.find(it->second.workers[r]);
    if (w == workers_.end() || w->second.task != task_id) continue;
    w->second.task.clear();
    if (actions && w->second.alive)
      actions->push_back({Action::kAbortTask, w->first, task_id, static_cast<int64_t>(r)});
  }
  tasks_.erase(it);
}

absl::Status Scheduler::Cancel(const std::string& job_id, double now,
                               std::vector<Action>* actions) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord& job = it->second;
  if (job.state == JobState::kSucceeded || job.state == JobState::kFailed ||
      job.state == JobState::kCancelled) {
    return absl::FailedPreconditionError(
        absl::StrCat(job_id, " already ended (", Name(job.state), ")"));
  }
  for (auto& st : job.stages) {
    if (!st.task.empty()) AbortTask(st.task, actions);
    st.task.clear();
    if (st.state == StageState::kPending || st.state == StageState::kRunning)
      st.state = StageState::kCancelled;
  }
  job.state = JobState::kCancelled;
  Event(job, now, "cancelled");
  return absl::OkStatus();
}

absl::Status Scheduler::Progress(const std::string& task_id, const std::string& worker,
                                 int64_t step, double loss) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end())
    return absl::NotFoundError(absl::StrCat("task ", task_id, " is not running"));
  const auto& ws = it->second.workers;
  if (std::find(ws.begin(), ws.end(), worker) == ws.end()) {
    return absl::PermissionDeniedError(
        absl::StrCat("worker ", worker, " is not part of task ", task_id));
  }
  StageRecord& st = jobs_[it->second.job_id].stages[it->second.stage];
  st.step = std::max(st.step, step);
  st.loss = loss;
  return absl::OkStatus();
}

absl::Status Scheduler::Complete(const std::string& task_id, const std::string& worker,
                                 double now) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end())
    return absl::NotFoundError(absl::StrCat("task ", task_id, " is not running"));
  TaskRecord& t = it->second;
  auto pos = std::find(t.workers.begin(), t.workers.end(), worker);
  if (pos == t.workers.end())
    return absl::PermissionDeniedError(
        absl::StrCat("worker ", worker, " is not part of task ", task_id));
  t.done[pos - t.workers.begin()] = true;
  workers_[worker].task.clear();
  if (!std::all_of(t.done.begin(), t.done.end(), [](bool b) { return b; })) return absl::OkStatus();
  JobRecord& job = jobs_[t.job_id];
  StageRecord& st = job.stages[t.stage];
  st.state = StageState::kSucceeded;
  st.task.clear();
  Event(job, now, absl::StrCat("stage ", st.spec.name, " succeeded"));
  tasks_.erase(it);
  if (std::all_of(job.stages.begin(), job.stages.end(),
                  [](const StageRecord& s) { return s.state == StageState::kSucceeded; })) {
    job.state = JobState::kSucceeded;
    Event(job, now, "succeeded");
  }
  return absl::OkStatus();
}

void Scheduler::FailTask(const std::string& task_id, const std::string& reason, double now,
                         std::vector<Action>* actions) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return;
  JobRecord& job = jobs_[it->second.job_id];
  StageRecord& st = job.stages[it->second.stage];
  AbortTask(task_id, actions);
  st.task.clear();
  if (st.restarts < st.spec.max_restarts) {
    ++st.restarts;
    st.state = StageState::kPending;
    Event(job, now,
          absl::StrCat("stage ", st.spec.name, " failed (", reason, "); restart ", st.restarts, "/",
                       st.spec.max_restarts, " from the latest checkpoint"));
  } else {
    st.state = StageState::kFailed;
    job.state = JobState::kFailed;
    Event(job, now,
          absl::StrCat("stage ", st.spec.name, " failed (", reason, ") after ", st.restarts,
                       " restart(s); job failed"));
  }
}

absl::Status Scheduler::Fail(const std::string& task_id, const std::string& worker,
                             const std::string& reason, double now, std::vector<Action>* actions) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end())
    return absl::NotFoundError(absl::StrCat("task ", task_id, " is not running"));
  const auto& ws = it->second.workers;
  if (std::find(ws.begin(), ws.end(), worker) == ws.end()) {
    return absl::PermissionDeniedError(
        absl::StrCat("worker ", worker, " is not part of task ", task_id));
  }
  workers_[worker].task.clear();  // it knows it failed: only the other ranks need an abort
  FailTask(task_id, absl::StrCat(worker, ": ", reason), now, actions);
  return absl::OkStatus();
}

std::vector<Action> Scheduler::Tick(double now) {
  std::vector<Action> actions;
  for (auto& [id, w] : workers_) {
    if (!w.alive || now - w.last_heartbeat <= opt_.heartbeat_timeout_s) continue;
    w.alive = false;
    if (!w.task.empty()) {
      const std::string t = w.task;
      w.task.clear();
      FailTask(t,
               absl::StrFormat("worker %s missed heartbeats for %.1fs", id, now - w.last_heartbeat),
               now, &actions);
    }
  }
  for (const auto& job_id : job_order_) {
    JobRecord& job = jobs_[job_id];
    if (job.state != JobState::kQueued && job.state != JobState::kRunning) continue;
    // Stages run in order: the first one not yet succeeded is the only runnable one.
    auto st_it = std::find_if(job.stages.begin(), job.stages.end(), [](const StageRecord& s) {
      return s.state != StageState::kSucceeded;
    });
    if (st_it == job.stages.end() || st_it->state != StageState::kPending) continue;
    std::vector<std::string> idle;
    for (const auto& [wid, w] : workers_) {
      if (w.alive && w.task.empty()) idle.push_back(wid);
    }
    if (static_cast<int64_t>(idle.size()) < st_it->spec.workers)
      continue;  // wait for enough workers
    TaskRecord t;
    t.job_id = job_id;
    t.stage = static_cast<size_t>(st_it - job.stages.begin());
    t.attempt = st_it->restarts;
    t.id = absl::StrCat(job_id, "/", st_it->spec.name, "/", t.attempt);
    t.workers.assign(idle.begin(), idle.begin() + st_it->spec.workers);
    t.done.assign(t.workers.size(), false);
    // A fresh port per attempt: a dead rank 0's TCPStore may still hold the old one.
    t.rendezvous =
        absl::StrCat(opt_.rendezvous_host, ":", opt_.rendezvous_base_port + (next_port_++ % 1000));
    // NCCL needs a GPU on every rank; Gloo runs anywhere (CUDA tensors too).
    t.backend = std::all_of(t.workers.begin(), t.workers.end(),
                            [this](const std::string& w) {
                              const WorkerRecord& r = workers_.at(w);
                              return r.device == "cuda" && r.device_count > 0;
                            })
                    ? "nccl"
                    : "gloo";
    for (size_t r = 0; r < t.workers.size(); ++r) {
      workers_[t.workers[r]].task = t.id;
      actions.push_back({Action::kStartTask, t.workers[r], t.id, static_cast<int64_t>(r)});
    }
    st_it->state = StageState::kRunning;
    st_it->task = t.id;
    job.state = JobState::kRunning;
    Event(job, now,
          absl::StrCat("stage ", st_it->spec.name, " attempt ", t.attempt, " started on ",
                       t.workers.size(), " worker(s)"));
    tasks_[t.id] = std::move(t);
  }
  return actions;
}

}  // namespace sd::coord
