// The coordinator's scheduling policy, driven without sockets or threads.
#include <gtest/gtest.h>

#include <set>

#include "coordinator/scheduler.h"

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

TEST(SchedulerStateTest, StageWaitsForEnoughWorkersThenStartsAllRanks) {
  Scheduler s({});
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

TEST(SchedulerStateTest, NcclOnlyWhenEveryRankHasAGpu) {
  Scheduler s({});
  const std::string a = s.Submit(Spec(2), 0);
  s.RegisterWorker("g1", "cuda", 1, 0);
  s.RegisterWorker("g2", "cuda", 2, 0);
  auto actions = s.Tick(1);
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(s.task(actions[0].task)->backend, "nccl");
  // A CPU worker in the group: Gloo for everyone.
  Scheduler m({});
  m.Submit(Spec(2), 0);
  m.RegisterWorker("g1", "cuda", 1, 0);
  m.RegisterWorker("c1", "cpu", 0, 0);
  actions = m.Tick(1);
  ASSERT_EQ(actions.size(), 2u);
  EXPECT_EQ(m.task(actions[0].task)->backend, "gloo");
  (void)a;
}

TEST(SchedulerStateTest, JobSucceedsWhenEveryRankCompletes) {
  Scheduler s({});
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
  EXPECT_FALSE(s.Complete(a[0].task, "w2", 3).ok());  // the task is gone
}

TEST(SchedulerStateTest, MissedHeartbeatRestartsTheStageUntilMaxRestarts) {
  SchedulerOptions o;
  o.heartbeat_timeout_s = 5;
  Scheduler s(o);
  const std::string job = s.Submit(Spec(1, 1), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  s.RegisterWorker("w2", "cpu", 1, 0);
  auto a = Starts(s.Tick(0));
  ASSERT_EQ(a.size(), 1u);
  const std::string first = a[0].worker;
  const std::string other = first == "w1" ? "w2" : "w1";
  ASSERT_TRUE(s.Heartbeat(other, 4).ok());
  ASSERT_TRUE(s.Heartbeat(other, 8).ok());
  auto b = Starts(s.Tick(8));  // `first` last beat at 0: expired; the stage restarts on `other`
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

TEST(SchedulerStateTest, OneRankFailingAbortsTheOthers) {
  Scheduler s({});
  s.Submit(Spec(2), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  s.RegisterWorker("w2", "cpu", 1, 0);
  auto a = s.Tick(0);
  std::vector<Action> aborts;
  ASSERT_TRUE(s.Fail(a[0].task, "w1", "nan loss", 1, &aborts).ok());
  ASSERT_EQ(aborts.size(), 1u);
  EXPECT_EQ(aborts[0].kind, Action::kAbortTask);
  EXPECT_EQ(aborts[0].worker, "w2");
  EXPECT_EQ(Starts(s.Tick(2)).size(), 2u);  // restarted on both
}

TEST(SchedulerStateTest, CancelAbortsRunningTaskAndIsFinal) {
  Scheduler s({});
  const std::string job = s.Submit(Spec(1), 0);
  s.RegisterWorker("w1", "cpu", 1, 0);
  auto a = s.Tick(0);
  std::vector<Action> aborts;
  ASSERT_TRUE(s.Cancel(job, 1, &aborts).ok());
  ASSERT_EQ(aborts.size(), 1u);
  EXPECT_EQ(s.job(job)->state, JobState::kCancelled);
  EXPECT_FALSE(s.Cancel(job, 2, &aborts).ok());
  EXPECT_TRUE(s.Tick(3).empty());
  EXPECT_TRUE(s.workers().at("w1").task.empty());
}

TEST(SchedulerStateTest, TwentyJobsOnTwoWorkersNeverOverlap) {
  Scheduler s({});
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

}  // namespace
}  // namespace sd::coord
