#include "coordinator/job_store.h"
#include "stages/catalog.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

namespace sd::coord {
namespace {

TEST(JobStoreTest, CoordinatorRestartKeepsJobsAndResumesRunningStages) {
  const std::string path =
      std::filesystem::temp_directory_path() / ("jobs_" + std::to_string(::getpid()) + ".db");
  std::filesystem::remove(path);
  const std::string yaml = "model: /m\ndataset: /d\nstages: [finetune]\n";
  std::string running, queued;
  {
    auto store = JobStore::Open(path);
    ASSERT_TRUE(store.ok()) << store.status();
    JobScheduler s({});
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
  JobScheduler s({});  // heartbeat timeout 10 s
  s.Restore(*jobs, 10);
  const JobRecord* j = s.job(running);
  ASSERT_NE(j, nullptr);
  // Its worker may still be training: the stage waits for it to report back.
  EXPECT_EQ(j->stages[0].state, StageState::kRunning);
  EXPECT_EQ(j->stages[0].step, 42);
  EXPECT_EQ(j->stages[0].attempts, 1);
  EXPECT_NE(j->events.back().find("coordinator restarted"), std::string::npos);
  // New ids continue after the restored ones.
  EXPECT_GT(s.Submit(*ParseJobSpec(yaml, "c.yaml"), 11, yaml), queued);
  s.RegisterWorker("w1", "cpu", 1, 11);  // back, but running nothing
  auto actions = s.Tick(12);
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(s.task(actions[0].task)->job_id, queued);  // the next job; the first waits
  s.RegisterWorker("w2", "cpu", 1, 20);
  actions = s.Tick(21);  // past the adoption deadline: the stage resumes, a new attempt
  ASSERT_EQ(actions.size(), 1u);
  EXPECT_EQ(actions[0].task, running + "/finetune/1");
  EXPECT_EQ(s.job(running)->stages[0].restarts, 0);
  std::filesystem::remove(path);
}

std::string TempDb(const std::string& name) {
  const std::string path =
      std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()) + ".db");
  std::filesystem::remove(path);
  return path;
}

TEST(JobStoreTest, JobNumbersAreNeverHandedOutTwice) {
  const std::string path = TempDb("jobs_numbers");
  {
    auto store = JobStore::Open(path);
    ASSERT_TRUE(store.ok());
    EXPECT_EQ(*(*store)->AllocateJobNumber(), 1);
    EXPECT_EQ(*(*store)->AllocateJobNumber(), 2);  // 1 was handed out, even if never stored
  }
  auto store = JobStore::Open(path);
  ASSERT_TRUE(store.ok());
  EXPECT_EQ(*(*store)->AllocateJobNumber(), 3);  // durable across a restart
  // A store from before the counter continues after the jobs it holds.
  JobRecord j = JobScheduler::NewJob(
      "job-000041", *ParseJobSpec("model: /m\ndataset: /d\nstages: [finetune]\n", "a"),
      "model: /m\n", 0);
  ASSERT_TRUE((*store)->Save(j).ok());
  EXPECT_EQ(*(*store)->AllocateJobNumber(), 42);
  std::filesystem::remove(path);
}

TEST(JobStoreTest, StoredJobTextComesBackByteForByteAndABadOneLoadsAsFailed) {
  const std::string path = TempDb("jobs_text");
  const std::string with_nul("model: /m\n# a \0 b\nstages: [finetune]\n", 37);
  {
    auto store = JobStore::Open(path);
    ASSERT_TRUE(store.ok());
    JobRecord a = JobScheduler::NewJob(
        "job-000001", *ParseJobSpec("model: /m\ndataset: /d\nstages: [finetune]\n", "a"), with_nul,
        0);
    ASSERT_TRUE((*store)->Save(a).ok());
    // Written by another build: a key this one does not know.
    const std::string old_yaml = "model: /m\nstages: [finetune]\nfinetune:\n  renamed_key: 1\n";
    JobRecord b = JobScheduler::NewJob(
        "job-000002", *ParseJobSpec("model: /m\ndataset: /d\nstages: [finetune]\n", "b"), old_yaml,
        0);
    b.stages[0].state = StageState::kRunning;
    b.state = JobState::kRunning;
    ASSERT_TRUE((*store)->Save(b).ok());
  }
  auto store = JobStore::Open(path);
  ASSERT_TRUE(store.ok());
  auto jobs = (*store)->LoadAll(5);
  ASSERT_TRUE(jobs.ok()) << jobs.status();  // the coordinator can start
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].yaml, with_nul);
  const JobRecord& b = (*jobs)[1];
  EXPECT_EQ(b.state, JobState::kFailed);
  EXPECT_EQ(b.stages[0].state, StageState::kFailed);
  EXPECT_NE(b.events.back().find("no longer parses"), std::string::npos);
  EXPECT_NE(b.events.back().find("renamed_key"), std::string::npos) << b.events.back();
  std::filesystem::remove(path);
}

TEST(JobStoreTest, AProgressSaveWithoutFsyncSurvivesACoordinatorCrash) {
  const std::string path = TempDb("jobs_relaxed");
  const std::string yaml = "model: /m\ndataset: /d\nstages: [finetune]\n";
  const pid_t child = ::fork();
  if (child == 0) {
    auto store = JobStore::Open(path);
    if (!store.ok()) ::_exit(2);
    JobRecord j = JobScheduler::NewJob("job-000001", *ParseJobSpec(yaml, "a"), yaml, 0);
    if (!(*store)->Save(j).ok()) ::_exit(3);
    j.stages[0].step = 77;
    j.events.push_back("1.000 w1: checkpoint rejected: step-00000004: ...");
    if (!(*store)->Save(j, JobStore::Durability::kRelaxed).ok()) ::_exit(4);
    ::_exit(0);  // dies without closing the database, as a killed coordinator does
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  auto store = JobStore::Open(path);
  ASSERT_TRUE(store.ok());
  auto jobs = (*store)->LoadAll();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].stages[0].step, 77);
  EXPECT_EQ((*jobs)[0].events.size(), 2u);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace sd::coord
