#include "coordinator/job_scheduler.h"

#include <algorithm>
#include <cmath>
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

Failure Classify(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument:    // a bad option or model config
    case absl::StatusCode::kNotFound:           // a missing model or dataset
    case absl::StatusCode::kResourceExhausted:  // no space left
    case absl::StatusCode::kDataLoss:           // every checkpoint corrupt, the data unusable
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kOutOfRange:
      return Failure::kPermanent;
    default:  // Unavailable, Aborted, Internal, Unknown, ...: a lost peer, a crash
      return Failure::kTransient;
  }
}

bool ParseTaskId(const std::string& id, std::string* job, std::string* stage, int64_t* attempt) {
  const size_t a = id.find('/'), b = id.rfind('/');
  if (a == std::string::npos || a == b) return false;
  char* end = nullptr;
  const long long n = std::strtoll(id.c_str() + b + 1, &end, 10);
  if (end == id.c_str() + b + 1 || *end != '\0') return false;
  *job = id.substr(0, a);
  *stage = id.substr(a + 1, b - a - 1);
  *attempt = n;
  return true;
}

void JobScheduler::Event(JobRecord& job, double now, const std::string& what) {
  job.events.push_back(absl::StrFormat("%.3f %s", now, what));
}

void JobScheduler::Note(const std::string& job_id, double now, const std::string& what) {
  if (auto it = jobs_.find(job_id); it != jobs_.end()) Event(it->second, now, what);
}

JobRecord JobScheduler::NewJob(const std::string& id, const JobSpec& spec, const std::string& yaml,
                               double now) {
  JobRecord job;
  job.id = id;
  job.yaml = yaml;
  job.spec = spec;
  for (const auto& st : spec.stages) {
    StageRecord r;
    r.spec = st;
    job.stages.push_back(std::move(r));
  }
  job.events.push_back(
      absl::StrFormat("%.3f submitted with %d stage(s)", now, static_cast<int>(job.stages.size())));
  return job;
}

void JobScheduler::Add(JobRecord job) {
  int64_t n = 0;
  if (sscanf(job.id.c_str(), "job-%ld", &n) == 1) next_job_ = std::max(next_job_, n + 1);
  const std::string id = job.id;
  if (!jobs_.contains(id)) job_order_.push_back(id);
  jobs_[id] = std::move(job);
}

std::string JobScheduler::Submit(const JobSpec& spec, double now, const std::string& yaml) {
  std::string id = absl::StrFormat("job-%06d", next_job_);
  Add(NewJob(id, spec, yaml, now));
  return id;
}

void JobScheduler::Restore(std::vector<JobRecord> jobs, double now) {
  for (auto& job : jobs) {
    for (size_t i = 0; i < job.stages.size(); ++i) {
      StageRecord& st = job.stages[i];
      st.task.clear();
      st.not_before = 0;
      if (st.state != StageState::kRunning) continue;
      if (st.attempts == 0) {  // stored by a build that did not number attempts
        st.state = StageState::kPending;
        Event(job, now,
              absl::StrCat("coordinator restarted; stage ", st.spec.name,
                           " will resume from its latest checkpoint"));
        continue;
      }
      // Its workers may still be training: wait for them to say so before
      // anything else runs this stage.
      TaskRecord t;
      t.job_id = job.id;
      t.stage = i;
      t.attempt = st.attempts - 1;
      t.id = absl::StrCat(job.id, "/", st.spec.name, "/", t.attempt);
      t.workers.assign(static_cast<size_t>(st.spec.workers), "");
      t.done.assign(t.workers.size(), false);
      t.adopt_deadline = now + opt_.heartbeat_timeout_s;
      st.task = t.id;
      Event(job, now,
            absl::StrFormat("coordinator restarted; waiting up to %.0fs for the workers of %s to "
                            "report back",
                            opt_.heartbeat_timeout_s, t.id));
      tasks_[t.id] = std::move(t);
    }
    Add(std::move(job));
  }
  std::sort(job_order_.begin(), job_order_.end());
}

const TaskRecord* JobScheduler::task(const std::string& id) const {
  auto it = tasks_.find(id);
  return it == tasks_.end() ? nullptr : &it->second;
}

const JobRecord* JobScheduler::job(const std::string& id) const {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : &it->second;
}

std::vector<Action> JobScheduler::RegisterWorker(const std::string& id, const std::string& device,
                                                 int64_t device_count, double now,
                                                 int64_t memory_bytes,
                                                 const std::string& running_task, int64_t rank) {
  std::vector<Action> actions;
  WorkerRecord& w = workers_[id];
  w.id = id;
  w.device = device;
  w.device_count = device_count;
  w.memory_bytes = memory_bytes;
  w.last_heartbeat = now;
  w.alive = true;
  if (running_task.empty()) {
    // Whatever it was given is lost (the process restarted before or during it).
    if (!w.task.empty() && !w.stopping && tasks_.contains(w.task)) {
      const std::string t = w.task;
      w.task.clear();
      FailTask(t, absl::StrCat("worker ", id, " restarted"), Failure::kTransient, true, now,
               &actions);
    }
    w.task.clear();
    w.stopping = false;
    return actions;
  }
  auto it = tasks_.find(running_task);
  const bool slot_ok = it != tasks_.end() && rank >= 0 &&
                       rank < static_cast<int64_t>(it->second.workers.size()) &&
                       (it->second.workers[rank] == id ||
                        (it->second.workers[rank].empty() && it->second.adopt_deadline > 0));
  if (slot_ok) {
    TaskRecord& t = it->second;
    t.workers[rank] = id;
    w.task = running_task;
    w.stopping = false;
    const bool all_back = std::none_of(t.workers.begin(), t.workers.end(),
                                       [](const std::string& x) { return x.empty(); });
    if (t.adopt_deadline > 0 && all_back) {
      t.adopt_deadline = 0;
      Event(jobs_[t.job_id], now,
            absl::StrCat("attempt ", t.id, " adopted: all ", t.workers.size(),
                         " rank(s) still running after the coordinator restart"));
    }
    return actions;
  }
  // A stale attempt (superseded, aborted, or unknown to this coordinator): it
  // must stop, and until it has, its stage does not start again.
  w.task = running_task;
  w.stopping = true;
  actions.push_back({Action::kAbortTask, id, running_task, rank});
  std::string job_id, stage;
  int64_t attempt = 0;
  if (ParseTaskId(running_task, &job_id, &stage, &attempt) && jobs_.contains(job_id))
    Event(jobs_[job_id], now,
          absl::StrCat("worker ", id, " still runs ", running_task,
                       ", which is not the current attempt; told to stop"));
  return actions;
}

void JobScheduler::SetMetricsAddress(const std::string& id, const std::string& address) {
  if (auto it = workers_.find(id); it != workers_.end()) it->second.metrics_address = address;
}

absl::Status JobScheduler::Heartbeat(const std::string& id, double now) {
  auto it = workers_.find(id);
  if (it == workers_.end() || !it->second.alive) {
    return absl::NotFoundError(absl::StrCat("worker ", id, " is not registered; register again"));
  }
  it->second.last_heartbeat = now;
  return absl::OkStatus();
}

void JobScheduler::AbortTask(const std::string& task_id, std::vector<Action>* actions) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return;
  for (size_t r = 0; r < it->second.workers.size(); ++r) {
    auto w = workers_.find(it->second.workers[r]);
    if (w == workers_.end() || w->second.task != task_id) continue;
    if (!w->second.alive) {
      w->second.task.clear();
      continue;
    }
    // Busy until it confirms: a new attempt must not overlap this one.
    w->second.stopping = true;
    if (actions)
      actions->push_back({Action::kAbortTask, w->first, task_id, static_cast<int64_t>(r)});
  }
  tasks_.erase(it);
}

bool JobScheduler::ReleaseStopping(const std::string& worker, const std::string& task) {
  auto w = workers_.find(worker);
  if (w == workers_.end() || w->second.task != task || !w->second.stopping) return false;
  w->second.task.clear();
  w->second.stopping = false;
  return true;
}

bool JobScheduler::StageBusy(const std::string& job_id, const std::string& stage) const {
  const std::string prefix = absl::StrCat(job_id, "/", stage, "/");
  return std::any_of(workers_.begin(), workers_.end(), [&](const auto& kv) {
    return kv.second.alive && kv.second.task.rfind(prefix, 0) == 0;
  });
}

absl::Status JobScheduler::Cancel(const std::string& job_id, double now,
                                  std::vector<Action>* actions) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord& job = it->second;
  if (Ended(job.state)) {
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

absl::Status JobScheduler::Resume(const std::string& job_id, double now) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord& job = it->second;
  if (job.state != JobState::kFailed && job.state != JobState::kCancelled)
    return absl::FailedPreconditionError(absl::StrCat(
        job_id, " is ", Name(job.state), "; only a failed or cancelled job can be resumed"));
  std::string first;
  for (auto& st : job.stages) {
    if (st.state == StageState::kSucceeded) continue;
    if (first.empty()) first = st.spec.name;
    st.state = StageState::kPending;
    st.restarts = 0;
    st.not_before = 0;
  }
  job.state = JobState::kQueued;
  Event(job, now,
        absl::StrCat("resumed; stage ", first, " continues from its newest valid checkpoint"));
  return absl::OkStatus();
}

absl::Status JobScheduler::Progress(const std::string& task_id, const std::string& worker,
                                    int64_t step, double loss) {
  auto it = tasks_.find(task_id);
  const bool member = it != tasks_.end() &&
                      std::find(it->second.workers.begin(), it->second.workers.end(), worker) !=
                          it->second.workers.end();
  if (!member)
    return absl::FailedPreconditionError(
        absl::StrCat(task_id, " is not a current attempt of worker ", worker, "; stop it"));
  StageRecord& st = jobs_[it->second.job_id].stages[it->second.stage];
  st.step = std::max(st.step, step);
  st.loss = loss;
  return absl::OkStatus();
}

absl::Status JobScheduler::Complete(const std::string& task_id, const std::string& worker,
                                    double now, const std::function<absl::Status()>& commit) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) {
    ReleaseStopping(worker, task_id);
    // A retried Finish of an attempt that already succeeded is acknowledged again.
    std::string job_id, stage;
    int64_t attempt = 0;
    if (ParseTaskId(task_id, &job_id, &stage, &attempt) && jobs_.contains(job_id)) {
      for (const auto& st : jobs_[job_id].stages) {
        if (st.spec.name == stage && st.state == StageState::kSucceeded &&
            st.attempts == attempt + 1)
          return absl::OkStatus();
      }
    }
    return absl::FailedPreconditionError(
        absl::StrCat(task_id, " is not a current attempt; its result is discarded"));
  }
  TaskRecord& t = it->second;
  auto pos = std::find(t.workers.begin(), t.workers.end(), worker);
  if (pos == t.workers.end()) {
    ReleaseStopping(worker, task_id);
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker, " is not part of ", task_id, "; its result is discarded"));
  }
  t.done[pos - t.workers.begin()] = true;
  workers_[worker].task.clear();
  if (!std::all_of(t.done.begin(), t.done.end(), [](bool b) { return b; })) return absl::OkStatus();
  if (commit) {
    if (absl::Status s = commit(); !s.ok()) {
      FailTask(task_id, absl::StrCat("publishing the output failed: ", s.message()),
               Classify(s.code()), true, now, nullptr);
      return s;
    }
  }
  JobRecord& job = jobs_[t.job_id];
  StageRecord& st = job.stages[t.stage];
  st.state = StageState::kSucceeded;
  st.task.clear();
  st.error.clear();
  Event(job, now, absl::StrCat("stage ", st.spec.name, " succeeded"));
  tasks_.erase(it);
  if (std::all_of(job.stages.begin(), job.stages.end(),
                  [](const StageRecord& s) { return s.state == StageState::kSucceeded; })) {
    job.state = JobState::kSucceeded;
    Event(job, now, "succeeded");
  }
  return absl::OkStatus();
}

void JobScheduler::FailTask(const std::string& task_id, const std::string& reason, Failure kind,
                            bool count_restart, double now, std::vector<Action>* actions) {
  auto it = tasks_.find(task_id);
  if (it == tasks_.end()) return;
  JobRecord& job = jobs_[it->second.job_id];
  StageRecord& st = job.stages[it->second.stage];
  AbortTask(task_id, actions);
  st.task.clear();
  st.error = reason;
  if (kind == Failure::kPermanent) {
    st.state = StageState::kFailed;
    job.state = JobState::kFailed;
    Event(
        job, now,
        absl::StrCat("stage ", st.spec.name, " failed (", reason,
                     "); a restart cannot fix this, so the job failed: fix the cause, then `sdctl "
                     "resume ",
                     job.id, "`"));
    return;
  }
  if (!count_restart) {
    st.state = StageState::kPending;
    Event(job, now,
          absl::StrCat("stage ", st.spec.name, ": ", reason,
                       "; it resumes from its latest checkpoint"));
    return;
  }
  if (st.restarts < st.spec.max_restarts) {
    ++st.restarts;
    st.state = StageState::kPending;
    const double wait =
        std::min(opt_.restart_backoff_max_s,
                 opt_.restart_backoff_s * std::pow(2.0, static_cast<double>(st.restarts - 1)));
    st.not_before = now + wait;
    Event(job, now,
          absl::StrFormat("stage %s failed (%s); restart %d/%d from the latest checkpoint in %.0fs",
                          st.spec.name, reason, st.restarts, st.spec.max_restarts, wait));
  } else {
    st.state = StageState::kFailed;
    job.state = JobState::kFailed;
    Event(job, now,
          absl::StrCat("stage ", st.spec.name, " failed (", reason, ") after ", st.restarts,
                       " restart(s); job failed"));
  }
}

absl::Status JobScheduler::Fail(const std::string& task_id, const std::string& worker,
                                const std::string& reason, double now, std::vector<Action>* actions,
                                Failure kind) {
  auto it = tasks_.find(task_id);
  const bool member = it != tasks_.end() &&
                      std::find(it->second.workers.begin(), it->second.workers.end(), worker) !=
                          it->second.workers.end();
  if (!member) {
    // The usual answer of an aborted rank: it has stopped, and is free again.
    ReleaseStopping(worker, task_id);
    return absl::FailedPreconditionError(
        absl::StrCat(task_id, " is not a current attempt of worker ", worker));
  }
  workers_[worker].task.clear();  // it knows it failed: only the other ranks need an abort
  workers_[worker].stopping = false;
  FailTask(task_id, absl::StrCat(worker, ": ", reason), kind, true, now, actions);
  return absl::OkStatus();
}

std::vector<Action> JobScheduler::Tick(
    double now,
    const std::function<std::string(const std::string&, const std::string&)>& last_words) {
  std::vector<Action> actions;
  for (auto& [id, w] : workers_) {
    if (!w.alive || now - w.last_heartbeat <= opt_.heartbeat_timeout_s) continue;
    w.alive = false;
    const std::string t = w.task;
    const bool stopping = w.stopping;
    w.task.clear();
    w.stopping = false;
    if (t.empty()) continue;
    if (stopping) {
      std::string job_id, stage;
      int64_t attempt = 0;
      if (ParseTaskId(t, &job_id, &stage, &attempt))
        Note(job_id, now,
             absl::StrFormat("worker %s missed heartbeats for %.1fs while stopping %s; counted as "
                             "stopped",
                             id, now - w.last_heartbeat, t));
      continue;
    }
    std::string why = last_words ? last_words(id, t) : "";
    if (why.empty())
      why = absl::StrFormat("worker %s missed heartbeats for %.1fs", id, now - w.last_heartbeat);
    FailTask(t, why, Failure::kTransient, true, now, &actions);
  }
  std::vector<std::string> unadopted;
  for (const auto& [id, t] : tasks_) {
    if (t.adopt_deadline > 0 && now > t.adopt_deadline) unadopted.push_back(id);
  }
  for (const auto& id : unadopted) {
    const TaskRecord& t = tasks_.at(id);
    const auto back = std::count_if(t.workers.begin(), t.workers.end(),
                                    [](const std::string& x) { return !x.empty(); });
    FailTask(id,
             absl::StrFormat("after the coordinator restart only %d of %d rank(s) of %s came back",
                             static_cast<int>(back), static_cast<int>(t.workers.size()), id),
             Failure::kTransient, false, now, &actions);
  }
  for (const auto& job_id : job_order_) {
    JobRecord& job = jobs_[job_id];
    if (job.state != JobState::kQueued && job.state != JobState::kRunning) continue;
    // Stages run in order: the first one not yet succeeded is the only runnable one.
    auto st_it = std::find_if(job.stages.begin(), job.stages.end(), [](const StageRecord& s) {
      return s.state != StageState::kSucceeded;
    });
    if (st_it == job.stages.end() || st_it->state != StageState::kPending) continue;
    if (now < st_it->not_before || StageBusy(job_id, st_it->spec.name)) continue;
    std::vector<std::string> idle;
    for (const auto& [wid, w] : workers_) {
      if (w.alive && w.task.empty()) idle.push_back(wid);
    }
    if (static_cast<int64_t>(idle.size()) < st_it->spec.workers)
      continue;  // wait for enough workers
    TaskRecord t;
    t.job_id = job_id;
    t.stage = static_cast<size_t>(st_it - job.stages.begin());
    t.attempt = st_it->attempts++;
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
