// The coordinator's scheduling policy, driven without sockets or threads.
#include <gtest/gtest.h>

#include <set>

#include "coordinator/job_scheduler.h"

namespace sd::coord {
namespace {

JobSpec Spec(int64_t workers = 1, int64_t max_restarts = 2) {
  JobSpec s;
  s.model = "/m";
  s.stages = {StageSpec{"finetune", workers, max_restarts}};
  return s;
}

std::vector<Action> Starts(const std::vector<Action>& a) {
  std::vector<Action> out;
  for (const auto& x : a) {
    if (x.kind == Action::kStartTask) out.push_back(x);
  }
  return out;
}

TEST(JobSchedulerTest, StageWaitsForEnoughWorkersThenStartsAllRanks) {
  JobScheduler s({});
  const std::string job = s.Submit(Spec(2), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  EXPECT_TRUE(s.Tick(1).empty());
  EXPECT_EQ(s.job(job)->state, JobState::kQueued);
  s.RegisterWorker("w2", "cpu", 1, 1);
  auto actions = s.Tick(2);
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(actions[0].rank, 0);
  EXPECT_EQ(actions[1].rank, 1);
  EXPECT_EQ(actions[0].task, actions[1].task);
  EXPECT_EQ(s.job(job)->state, JobState::kRunning);
  const TaskRecord* t = s.task(actions[0].task);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->rendezvous, "127.0.0.1:29500");
  EXPECT_EQ(t->backend, "gloo");
}

TEST(JobSchedulerTest, NcclOnlyWhenEveryRankHasAGpu) {
  JobScheduler s({});
  const std::string a = s.Submit(Spec(2), 0);
  s.RegisterWorker("g1", "cuda", 1, 0);
  s.RegisterWorker("g2", "cuda", 2, 0);
  auto actions = s.Tick(1);
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(s.task(actions[0].task)->backend, "nccl");
  // A CPU worker in the group: Gloo for everyone.
  JobScheduler m({});
  m.Submit(Spec(2), 0);
  m.RegisterWorker("g1", "cuda", 1, 0);
  m.RegisterWorker("c1", "cpu", 0, 0);
  actions = m.Tick(1);
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(m.task(actions[0].task)->backend, "gloo");
  (void)a;
}

TEST(JobSchedulerTest, JobSucceedsWhenEveryRankCompletes) {
  JobScheduler s({});
  const std::string job = s.Submit(Spec(2), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  s.RegisterWorker("w2", "cpu", 1, 0);
  auto a = s.Tick(1);
  ASSERT_TRUE(s.Progress(a[0].task, "w1", 10, 0.5).ok());
  EXPECT_EQ(s.job(job)->stages[0].step, 10);
  ASSERT_TRUE(s.Complete(a[0].task, "w1", 2).ok());
  EXPECT_EQ(s.job(job)->state, JobState::kRunning);
  ASSERT_TRUE(s.Complete(a[0].task, "w2", 3).ok());
  EXPECT_EQ(s.job(job)->state, JobState::kSucceeded);
  // Finish is idempotent: a retry of the last rank's (its answer was lost) is OK.
  EXPECT_TRUE(s.Complete(a[0].task, "w2", 3).ok());
  EXPECT_EQ(s.Complete(job + "/finetune/7", "w2", 3).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(JobSchedulerTest, MissedHeartbeatRestartsTheStageUntilMaxRestarts) {
  JobSchedulerOptions o;
  o.heartbeat_timeout_s = 5;
  JobScheduler s(o);
  const std::string job = s.Submit(Spec(1, 1), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  s.RegisterWorker("w2", "cpu", 1, 0);
  auto a = Starts(s.Tick(0));
  ASSERT_EQ(a.size(), 1u);
  const std::string first = a[0].worker;
  const std::string other = first == "w1" ? "w2" : "w1";
  ASSERT_TRUE(s.Heartbeat(other, 4).ok());
  ASSERT_TRUE(s.Heartbeat(other, 8).ok());
  // `first` last beat at 0: expired; the stage restarts on `other` after the back-off.
  EXPECT_TRUE(Starts(s.Tick(8)).empty());
  ASSERT_TRUE(s.Heartbeat(other, 9.9).ok());
  EXPECT_TRUE(Starts(s.Tick(9.9)).empty());
  auto b = Starts(s.Tick(10));
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(b[0].worker, other);
  EXPECT_NE(b[0].task, a[0].task);
  EXPECT_NE(s.task(b[0].task)->rendezvous, "127.0.0.1:29500");
  EXPECT_EQ(s.job(job)->stages[0].restarts, 1);
  EXPECT_FALSE(s.Heartbeat(first, 9).ok());  // a dead worker must register again
  // A second failure exceeds max_restarts = 1.
  std::vector<Action> aborts;
  ASSERT_TRUE(s.Fail(b[0].task, other, "out of memory", 9, &aborts).ok());
  EXPECT_EQ(s.job(job)->state, JobState::kFailed);
  EXPECT_EQ(s.job(job)->stages[0].state, StageState::kFailed);
  EXPECT_NE(s.job(job)->events.back().find("out of memory"), std::string::npos);
}

TEST(JobSchedulerTest, OneRankFailingAbortsTheOthers) {
  JobScheduler s({});
  s.Submit(Spec(2), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  s.RegisterWorker("w2", "cpu", 1, 0);
  auto a = s.Tick(0);
  std::vector<Action> aborts;
  ASSERT_TRUE(s.Fail(a[0].task, "w1", "nan loss", 1, &aborts).ok());
  ASSERT_EQ(aborts.size(), 1u);
  EXPECT_EQ(aborts[0].kind, Action::kAbortTask);
  EXPECT_EQ(aborts[0].worker, "w2");
  // w2 may still be in the middle of a step: the new attempt waits until it says
  // it stopped (or its heartbeats expire), back-off or not.
  EXPECT_TRUE(Starts(s.Tick(5)).empty());
  EXPECT_EQ(s.Fail(a[0].task, "w2", "stopped at step 3", 5, &aborts).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Starts(s.Tick(5)).size(), 2u);  // restarted on both
}

TEST(JobSchedulerTest, CancelAbortsRunningTaskAndIsFinal) {
  JobScheduler s({});
  const std::string job = s.Submit(Spec(1), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  auto a = s.Tick(0);
  std::vector<Action> aborts;
  ASSERT_TRUE(s.Cancel(job, 1, &aborts).ok());
  ASSERT_EQ(aborts.size(), 1u);
  EXPECT_EQ(s.job(job)->state, JobState::kCancelled);
  EXPECT_FALSE(s.Cancel(job, 2, &aborts).ok());
  EXPECT_TRUE(s.Tick(3).empty());
  EXPECT_TRUE(s.workers().at("w1").stopping);  // busy until it has stopped
  EXPECT_FALSE(s.Fail(a[0].task, "w1", "stopped at step 1", 4, &aborts).ok());
  EXPECT_TRUE(s.workers().at("w1").task.empty());
}

TEST(JobSchedulerTest, TwentyJobsOnTwoWorkersNeverOverlap) {
  JobScheduler s({});
  std::vector<std::string> jobs;
  jobs.reserve(20);
  for (int i = 0; i < 20; ++i) jobs.push_back(s.Submit(Spec(1), 0));
  s.RegisterWorker("w1", "cpu", 1, 0);
  s.RegisterWorker("w2", "cpu", 1, 0);
  std::set<std::string> started;
  double now = 0;
  for (int round = 0; round < 100; ++round) {
    now += 1;
    s.Heartbeat("w1", now).IgnoreError();
    s.Heartbeat("w2", now).IgnoreError();
    auto actions = s.Tick(now);
    std::set<std::string> busy;
    for (const auto& a : actions) {
      ASSERT_TRUE(busy.insert(a.worker).second) << "worker given two tasks at once";
      ASSERT_TRUE(started.insert(a.task).second) << "task started twice: " << a.task;
    }
    for (const auto& a : actions) ASSERT_TRUE(s.Complete(a.task, a.worker, now).ok());
  }
  for (const auto& j : jobs) EXPECT_EQ(s.job(j)->state, JobState::kSucceeded) << j;
  EXPECT_EQ(started.size(), 20u);
}

// The coordinator restarts while w1 trains attempt 0: its records come back from
// the store, and w1 re-registers saying what it runs.
struct Restarted {
  JobScheduler s{[] {
    JobSchedulerOptions o;
    o.heartbeat_timeout_s = 5;
    return o;
  }()};
  std::string job, task;
  explicit Restarted(int64_t workers = 1) {
    JobScheduler before({});
    job = before.Submit(Spec(workers), 0);
    for (int64_t i = 1; i <= workers; ++i)
      before.RegisterWorker("w" + std::to_string(i), "cpu", 1, 0);
    task = Starts(before.Tick(1))[0].task;
    std::vector<JobRecord> stored;
    for (const auto& [id, j] : before.jobs()) stored.push_back(j);
    s.Restore(stored, 10);
  }
};

TEST(JobSchedulerTest, RestartAdoptsTheRunningAttemptInsteadOfStartingAnother) {
  Restarted r(2);
  EXPECT_EQ(r.s.job(r.job)->stages[0].state, StageState::kRunning);
  EXPECT_TRUE(r.s.RegisterWorker("w3", "cpu", 1, 10).empty());  // an idle newcomer
  EXPECT_TRUE(r.s.RegisterWorker("w1", "cpu", 1, 10, 0, r.task, 0).empty());
  EXPECT_TRUE(Starts(r.s.Tick(11)).empty());  // w3 is idle, but the stage is not free
  EXPECT_TRUE(r.s.RegisterWorker("w2", "cpu", 1, 11, 0, r.task, 1).empty());
  EXPECT_NE(r.s.job(r.job)->events.back().find("adopted"), std::string::npos);
  ASSERT_TRUE(r.s.Progress(r.task, "w2", 5, 0.1).ok());
  for (double t = 12; t < 40; t += 2) {  // long past the adoption deadline: still the one attempt
    r.s.Heartbeat("w1", t).IgnoreError();
    r.s.Heartbeat("w2", t).IgnoreError();
    r.s.Heartbeat("w3", t).IgnoreError();
    EXPECT_TRUE(Starts(r.s.Tick(t)).empty()) << t;
  }
  ASSERT_TRUE(r.s.Complete(r.task, "w1", 40).ok());
  ASSERT_TRUE(r.s.Complete(r.task, "w2", 40).ok());
  EXPECT_EQ(r.s.job(r.job)->state, JobState::kSucceeded);
  EXPECT_EQ(r.s.job(r.job)->stages[0].restarts, 0);
}

TEST(JobSchedulerTest, AStaleAttemptIsStoppedAndNothingOverlapsIt) {
  Restarted r;
  // Nobody reports back in time: the attempt is given up (not counted as a restart).
  r.s.RegisterWorker("w2", "cpu", 1, 16);
  auto started = Starts(r.s.Tick(16));
  ASSERT_EQ(started.size(), 1u);
  const std::string next = started[0].task;
  EXPECT_EQ(next, r.job + "/finetune/1");  // a new number, never attempt 0 again
  EXPECT_EQ(r.s.job(r.job)->stages[0].restarts, 0);
  // w1 was only cut off and is still training attempt 0: told to stop, and its
  // reports and result are refused.
  auto acts = r.s.RegisterWorker("w1", "cpu", 1, 17, 0, r.task, 0);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_EQ(acts[0].kind, Action::kAbortTask);
  EXPECT_EQ(acts[0].task, r.task);
  EXPECT_EQ(r.s.Progress(r.task, "w1", 9, 0.1).code(), absl::StatusCode::kFailedPrecondition);
  int commits = 0;
  EXPECT_EQ(r.s.Complete(r.task, "w1", 18, [&] { return ++commits, absl::OkStatus(); }).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(commits, 0);  // only the current attempt publishes its output
  EXPECT_TRUE(r.s.workers().at("w1").task.empty());  // released by its (refused) Finish
  ASSERT_TRUE(r.s.Complete(next, "w2", 19, [&] { return ++commits, absl::OkStatus(); }).ok());
  EXPECT_EQ(commits, 1);
  EXPECT_EQ(r.s.job(r.job)->state, JobState::kSucceeded);
  // The retried Finish of the same attempt publishes nothing again.
  ASSERT_TRUE(r.s.Complete(next, "w2", 20, [&] { return ++commits, absl::OkStatus(); }).ok());
  EXPECT_EQ(commits, 1);
}

TEST(JobSchedulerTest, AStoppingWorkerHoldsItsStageUntilItHasStopped) {
  Restarted r;
  EXPECT_TRUE(Starts(r.s.Tick(16)).empty());  // given up; no workers yet
  EXPECT_EQ(r.s.job(r.job)->stages[0].state, StageState::kPending);
  ASSERT_EQ(r.s.RegisterWorker("w1", "cpu", 1, 17, 0, r.task, 0).size(), 1u);  // stale: stop
  r.s.RegisterWorker("w2", "cpu", 1, 17);
  EXPECT_TRUE(Starts(r.s.Tick(18)).empty());  // w2 is free, but w1 may still write
  std::vector<Action> none;
  EXPECT_FALSE(r.s.Fail(r.task, "w1", "stopped at step 4", 19, &none).ok());
  EXPECT_EQ(Starts(r.s.Tick(19)).size(), 1u);
}

TEST(JobSchedulerTest, AWorkerBackWithNothingRunningLostItsTask) {
  JobScheduler s({});
  const std::string job = s.Submit(Spec(1), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  ASSERT_EQ(Starts(s.Tick(0)).size(), 1u);
  s.RegisterWorker("w1", "cpu", 1, 1);  // its process restarted
  EXPECT_EQ(s.job(job)->stages[0].state, StageState::kPending);
  EXPECT_EQ(s.job(job)->stages[0].restarts, 1);
  EXPECT_NE(s.job(job)->events.back().find("worker w1 restarted"), std::string::npos);
}

TEST(JobSchedulerTest, PermanentFailuresEndTheJobAtOnceAndResumeRunsItAgain) {
  EXPECT_EQ(Classify(absl::StatusCode::kNotFound), Failure::kPermanent);
  EXPECT_EQ(Classify(absl::StatusCode::kResourceExhausted), Failure::kPermanent);
  EXPECT_EQ(Classify(absl::StatusCode::kInvalidArgument), Failure::kPermanent);
  EXPECT_EQ(Classify(absl::StatusCode::kUnavailable), Failure::kTransient);
  EXPECT_EQ(Classify(absl::StatusCode::kInternal), Failure::kTransient);
  JobScheduler s({});
  const std::string job = s.Submit(Spec(1, 5), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  auto a = Starts(s.Tick(0));
  std::vector<Action> none;
  ASSERT_TRUE(
      s.Fail(a[0].task, "w1", "no space left on device", 1, &none, Failure::kPermanent).ok());
  EXPECT_EQ(s.job(job)->state, JobState::kFailed);
  EXPECT_EQ(s.job(job)->stages[0].restarts, 0);  // no restart spent on it
  EXPECT_NE(s.job(job)->events.back().find("sdctl resume " + job), std::string::npos);
  EXPECT_EQ(s.Resume("job-999999", 2).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(s.Resume(job, 2).ok());
  EXPECT_EQ(s.job(job)->state, JobState::kQueued);
  auto b = Starts(s.Tick(2));
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(b[0].task, job + "/finetune/1");
  EXPECT_EQ(s.Resume(job, 3).code(), absl::StatusCode::kFailedPrecondition);  // running
}

TEST(JobSchedulerTest, TransientFailuresBackOffExponentially) {
  JobSchedulerOptions o;
  o.restart_backoff_s = 2;
  o.restart_backoff_max_s = 5;
  JobScheduler s(o);
  const std::string job = s.Submit(Spec(1, 10), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  double now = 0;
  std::vector<double> waits;
  auto a = Starts(s.Tick(now));
  for (int i = 0; i < 4; ++i) {
    std::vector<Action> none;
    ASSERT_TRUE(s.Fail(a[0].task, "w1", "peer vanished", now, &none).ok());
    const double failed_at = now;
    do {
      now += 0.5;
      s.Heartbeat("w1", now).IgnoreError();
      a = Starts(s.Tick(now));
    } while (a.empty());
    waits.push_back(now - failed_at);
  }
  EXPECT_EQ(waits, (std::vector<double>{2, 4, 5, 5}));
  EXPECT_EQ(s.job(job)->stages[0].restarts, 4);
}

TEST(JobSchedulerTest, ADeadWorkersLastWordsAreTheStagesError) {
  JobSchedulerOptions o;
  o.heartbeat_timeout_s = 5;
  JobScheduler s(o);
  const std::string job = s.Submit(Spec(1), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  const std::string task = Starts(s.Tick(0))[0].task;
  s.Tick(6, [&](const std::string& w, const std::string& t) {
    return w == "w1" && t == task ? "worker w1 crashed: signal 8 (Floating point exception)" : "";
  });
  EXPECT_NE(s.job(job)->stages[0].error.find("signal 8"), std::string::npos);
  EXPECT_NE(s.job(job)->events.back().find("signal 8"), std::string::npos);
}

}  // namespace
}  // namespace sd::coord
