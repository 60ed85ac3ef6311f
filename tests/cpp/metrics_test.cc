#include "common/metrics.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

namespace sd::metrics {
namespace {

TEST(MetricsTest, RendersTheTextFormat) {
  Registry r;
  r.CounterAdd("sd_jobs_submitted_total", "Jobs submitted.", {});
  r.CounterAdd("sd_jobs_submitted_total", "Jobs submitted.", {}, 2);
  r.GaugeSet("sd_stage_step", "Latest step.", {{"job_id", "job-000001"}, {"stage", "finetune"}}, 42);
  r.HistogramObserve("sd_step_seconds", "Step time.", {{"worker", "w\"1"}}, 0.3, {0.1, 0.5, 1});
  const std::string text = r.Render();
  EXPECT_NE(text.find("# TYPE sd_jobs_submitted_total counter\nsd_jobs_submitted_total 3\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sd_stage_step{job_id=\"job-000001\",stage=\"finetune\"} 42\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sd_step_seconds_bucket{worker=\"w\\\"1\",le=\"0.1\"} 0\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sd_step_seconds_bucket{worker=\"w\\\"1\",le=\"0.5\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sd_step_seconds_bucket{worker=\"w\\\"1\",le=\"+Inf\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sd_step_seconds_count{worker=\"w\\\"1\"} 1\n"), std::string::npos) << text;
}

TEST(MetricsTest, MisuseIsRejected) {
  Registry r;
  EXPECT_THROW(r.CounterAdd("bad name", "x", {}), std::invalid_argument);
  EXPECT_THROW(r.CounterAdd("c", "x", {}, -1), std::invalid_argument);
  r.GaugeSet("g", "x", {}, 1);
  EXPECT_THROW(r.CounterAdd("g", "x", {}), std::invalid_argument);
}

TEST(MetricsTest, PromtoolAcceptsTheOutput) {
  if (std::system("command -v promtool > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "promtool not installed";
  Registry r;
  r.CounterAdd("sd_checkpoints_written_total", "Checkpoints written.", {{"stage", "finetune"}});
  r.GaugeSet("sd_workers", "Registered workers.", {{"state", "alive"}}, 2);
  r.HistogramObserve("sd_checkpoint_seconds", "Checkpoint write time.", {{"stage", "finetune"}},
                     1.5);
  const std::string path = "/tmp/metrics_test_" + std::to_string(::getpid()) + ".prom";
  std::ofstream(path) << r.Render();
  const int rc =
      std::system(("promtool check metrics < " + path + " > " + path + ".out 2>&1").c_str());
  std::ifstream in(path + ".out");
  std::string report((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(rc, 0) << report;
  std::remove(path.c_str());
  std::remove((path + ".out").c_str());
}

}  // namespace
}  // namespace sd::metrics
