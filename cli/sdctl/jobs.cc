// sdctl submit / status / list / cancel / workers / logs: the coordinator's clients.
#include <cstdio>
#include <iostream>

#include "absl/strings/str_format.h"
#include "cli/sdctl/commands.h"
#include "cli/sdctl/job_client.h"
#include "common/args.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sdctl {
namespace {

std::string Address(const Args& a) {
  const char* env = std::getenv("SDCTL_COORDINATOR");
  return a.Get("coordinator", env != nullptr ? env : "127.0.0.1:50051");
}

void PrintJob(const JobView& j) {
  std::cout << j.id << "  " << j.name << "  " << j.state << "\n";
  for (const auto& s : j.stages) {
    std::cout << absl::StrFormat(
        "  %-26s %-10s step %lld/%lld  loss %.4f  workers %lld  restarts %lld\n", s.name, s.state,
        static_cast<long long>(s.step), static_cast<long long>(s.total_steps), s.loss,
        static_cast<long long>(s.world_size), static_cast<long long>(s.restarts));
  }
}

}  // namespace

int JobsCommand(const std::string& cmd, int argc, char** argv) {
  // Positional argument first (job.yaml or a job id), then flags.
  std::string positional;
  if (argc > 0 && argv[0][0] != '-') {
    positional = argv[0];
    --argc;
    ++argv;
  }
  auto run = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(Args a, Args::Parse(argc, argv, {"coordinator"}, {}, {"f", "follow"}));
    auto client = JobClient::Connect(Address(a));
    const bool needs_arg =
        cmd == "submit" || cmd == "status" || cmd == "cancel" || cmd == "resume" || cmd == "logs";
    if (needs_arg && positional.empty()) {
      return absl::InvalidArgumentError(cmd == "submit" ? "usage: sdctl submit job.yaml"
                                                        : "usage: sdctl " + cmd + " JOB_ID");
    }
    if (cmd == "submit") {
      // Validate here first: a bad file never reaches the coordinator.
      ASSIGN_OR_RETURN(std::string yaml, sd::ReadFile(positional));
      RETURN_IF_ERROR(sd::ParseJobSpec(yaml, positional).status());
      ASSIGN_OR_RETURN(std::string id, client->Submit(yaml, positional));
      std::cout << id << std::endl;
    } else if (cmd == "status") {
      ASSIGN_OR_RETURN(JobView j, client->Get(positional));
      PrintJob(j);
    } else if (cmd == "list") {
      ASSIGN_OR_RETURN(auto jobs, client->List());
      for (const auto& j : jobs) {
        std::cout << absl::StrFormat("%-12s %-20s %s\n", j.id, j.name, j.state);
      }
    } else if (cmd == "cancel") {
      RETURN_IF_ERROR(client->Cancel(positional));
      std::cout << positional << " cancelled" << std::endl;
    } else if (cmd == "resume") {
      RETURN_IF_ERROR(client->Resume(positional));
      std::cout << positional << " resumed" << std::endl;
    } else if (cmd == "workers") {
      ASSIGN_OR_RETURN(auto ws, client->Workers());
      for (const auto& w : ws) {
        std::cout << absl::StrFormat(
            "%-24s %-5s x%lld  %6.1f GiB  %-6s heartbeat %.1fs ago  metrics %s  %s\n", w.id,
            w.device, static_cast<long long>(w.device_count),
            static_cast<double>(w.memory_bytes) / (1 << 30), w.alive ? "alive" : "lost",
            w.heartbeat_age_s, w.metrics_address.empty() ? "-" : w.metrics_address,
            w.task.empty() ? "idle" : w.task);
      }
    } else if (cmd == "logs") {
      const bool follow = a.Has("f") || a.Has("follow");
      RETURN_IF_ERROR(client->Events(positional, 0, follow,
                                     [](int64_t, const std::string& text, const JobView&) {
                                       std::cout << text << std::endl;
                                     }));
    }
    return absl::OkStatus();
  };
  absl::Status s = run();
  if (!s.ok()) {
    std::cerr << "sdctl " << cmd << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace sdctl
