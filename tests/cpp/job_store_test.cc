#include "coordinator/job_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

namespace sd::coord {
namespace {

TEST(JobStoreTest, CoordinatorRestartKeepsJobsAndResumesRunningStages) {
  const std::string path =
      std::filesystem::temp_directory_path() / ("jobs_" + std::to_string(::getpid()) + ".db");
  std::filesystem::remove(path);
  const std::string yaml = "model: /m\nstages: [finetune]\n";
  std::string running, queued;
  {
    auto store = JobStore::Open(path);
    ASSERT_TRUE(store.ok()) << store.status();
    Scheduler s({});
    running = s.Submit(*ParseJobSpec(yaml, "a.yaml"), 0, yaml);
    queued = s.Submit(*ParseJobSpec(yaml, "b.yaml"), 0, yaml);
    s.RegisterWorker("w1", "cpu", 1, 0);
    s.Tick(1);
    ASSERT_TRUE(s.Progress(s.job(running)->stages[0].task, "w1", 42, 0.25).ok());
    for (const auto& [id, job] : s.jobs()) ASSERT_TRUE((*store)->Save(job).ok());
  }  // the coordinator "dies" here
  auto store = JobStore::Open(path);
  ASSERT_TRUE(store.ok());
  auto jobs = (*store)->LoadAll();
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  ASSERT_EQ(jobs->size(), 2u);
  Scheduler s({});
  s.Restore(*jobs, 10);
  const JobRecord* j = s.job(running);
  ASSERT_NE(j, nullptr);
  EXPECT_EQ(j->stages[0].state, StageState::kPending);
  EXPECT_EQ(j->stages[0].step, 42);
  EXPECT_EQ(j->stages[0].restarts, 0);
  EXPECT_NE(j->events.back().find("coordinator restarted"), std::string::npos);
  // New ids continue after the restored ones; the restored jobs run again.
  EXPECT_GT(s.Submit(*ParseJobSpec(yaml, "c.yaml"), 11, yaml), queued);
  s.RegisterWorker("w1", "cpu", 1, 11);
  auto actions = s.Tick(12);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(s.task(actions[0].task)->job_id, running);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace sd::coord
