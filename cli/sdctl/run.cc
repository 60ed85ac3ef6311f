// sdctl run job.yaml: the embedded default. Starts a coordinator and local workers
// as child processes, submits the job, shows live progress, tears everything down
// and exits non-zero when the job did not succeed.
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/sdctl/commands.h"
#include "cli/sdctl/job_client.h"
#include "common/args.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sdctl {
namespace {
namespace fs = std::filesystem;

std::atomic<bool> g_interrupted{false};
void OnSigint(int) { g_interrupted = true; }

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0) ::close(fd);
    return 0;  // rare: sdctl then reports it cannot reach 127.0.0.1:0
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);  // a Ctrl-C in the terminal goes to sdctl, which tears down in order
    // If sdctl itself is killed (SIGKILL, a CI timeout), the daemons go with it
    // instead of training on, unowned, in the background.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) std::_Exit(1);
    FILE* f = std::fopen(log.c_str(), "a");
    if (f != nullptr) {
      ::dup2(fileno(f), STDOUT_FILENO);
      ::dup2(fileno(f), STDERR_FILENO);
    }
    std::vector<char*> args;
    args.reserve(argv.size() + 1);
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::_Exit(127);
  }
  return pid;
}

void Stop(const std::vector<pid_t>& pids) {
  for (pid_t p : pids) ::kill(p, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  for (pid_t p : pids) {
    while (::waitpid(p, nullptr, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(p, SIGKILL);
        ::waitpid(p, nullptr, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
}

// The stage in progress, or the last one once the job has ended.
std::string Bar(const JobView& j, double rate, bool tty) {
  for (size_t i = 0; i < j.stages.size(); ++i) {
    const auto& s = j.stages[i];
    const bool last = i + 1 == j.stages.size();
    if (s.state != "RUNNING" && s.state != "PENDING" && !last) continue;
    const double frac = s.total_steps > 0 ? static_cast<double>(s.step) / s.total_steps : 0;
    const int width = 30, filled = static_cast<int>(frac * width);
    std::string bar = std::string(filled, '#') + std::string(width - filled, '-');
    const double eta = rate > 0 ? (s.total_steps - s.step) / rate : 0;
    return absl::StrFormat("%s[%s] %s %lld/%lld  loss %.4f  %.2f it/s  ETA %.0fs%s",
                           tty ? "\r" : "", bar, s.name, static_cast<long long>(s.step),
                           static_cast<long long>(s.total_steps), s.loss, rate, eta,
                           tty ? "   " : "\n");
  }
  return "";
}

absl::Status Run(const std::string& path, int argc, char** argv, int* exit_code) {
  ASSIGN_OR_RETURN(Args a, Args::Parse(argc, argv, {"workers", "threads"}));
  ASSIGN_OR_RETURN(std::string yaml, sd::ReadFile(path));
  ASSIGN_OR_RETURN(sd::JobSpec spec, sd::ParseJobSpec(yaml, path));
  int64_t workers = 1;
  for (const auto& s : spec.stages) workers = std::max(workers, s.workers);
  ASSIGN_OR_RETURN(workers, a.Int("workers", workers));
  ASSIGN_OR_RETURN(
      int64_t threads,
      a.Int("threads", std::max<int64_t>(1, std::thread::hardware_concurrency() / workers)));
  const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
  const fs::path runs = fs::path(spec.output) / "runs";
  fs::create_directories(runs / "logs");
  const std::string addr = absl::StrCat("127.0.0.1:", FreePort());
  std::vector<pid_t> pids;
  pids.push_back(Spawn({(bin / "coordinator").string(), "--listen", addr, "--storage",
                        runs.string(), "--metrics-port", absl::StrCat(FreePort()),
                        "--rendezvous-base-port", absl::StrCat(FreePort())},
                       (runs / "logs" / "coordinator.log").string()));
  for (int64_t i = 0; i < workers; ++i) {
    pids.push_back(Spawn({(bin / "worker").string(), "--coordinator", addr, "--id",
                          absl::StrCat("local-", i), "--threads", absl::StrCat(threads)},
                         (runs / "logs" / absl::StrCat("worker-", i, ".log")).string()));
  }
  std::signal(SIGINT, OnSigint);
  std::signal(SIGTERM, OnSigint);  // `timeout`, `kill`: cancel and tear down as for Ctrl-C
  auto client = JobClient::Connect(addr);
  absl::StatusOr<std::string> job = absl::UnavailableError("not submitted");
  for (int i = 0; i < 100 && !job.ok(); ++i) {
    job = client->Submit(yaml, path);
    if (!job.ok() && job.status().code() != absl::StatusCode::kUnavailable) break;
    if (job.ok()) break;
    // A coordinator that could not start (its storage is another's) says why in its log.
    if (::waitpid(pids[0], nullptr, WNOHANG) == pids[0]) {
      pids.erase(pids.begin());
      auto log = sd::ReadFile((runs / "logs" / "coordinator.log").string());
      const std::string text = log.ok() ? *log : "";
      const size_t last = text.find_last_not_of('\n');
      const size_t from = last == std::string::npos ? 0 : text.rfind('\n', last);
      job = absl::UnavailableError(absl::StrCat(
          "the coordinator exited: ", text.substr(from == std::string::npos ? 0 : from + 1,
                                                  last == std::string::npos ? 0 : last - from)));
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!job.ok()) {
    Stop(pids);
    return job.status();
  }
  std::cerr << "sdctl run: " << *job << " on " << workers << " local worker(s); logs in "
            << (runs / "logs").string() << "\n";
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  JobView last;
  int64_t last_step = -1, rate_step = 0;
  auto rate_t = std::chrono::steady_clock::now();
  double rate = 0;
  while (true) {
    if (g_interrupted) {
      client->Cancel(*job).IgnoreError();
      std::cerr << "\nsdctl run: interrupted; " << *job << " cancelled\n";
      break;
    }
    auto j = client->Get(*job);
    if (j.ok()) {
      last = *j;
      int64_t step = 0;
      for (const auto& s : last.stages) {
        if (s.state == "RUNNING") step = s.step;
      }
      const auto now = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(now - rate_t).count();
      if (step != last_step && dt > 0.5) {
        rate = std::max(0.0, (step - rate_step) / dt);
        rate_step = step;
        rate_t = now;
      }
      const bool ended =
          last.state == "SUCCEEDED" || last.state == "FAILED" || last.state == "CANCELLED";
      if (step != last_step || ended) std::cerr << Bar(last, rate, tty);
      last_step = step;
      if (ended) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }
  if (tty) std::cerr << "\n";
  // The event log tells why a job failed; show its tail before tearing down.
  if (last.state != "SUCCEEDED") {
    client
        ->Events(
            *job, 0, false,
            [](int64_t, const std::string& text, const JobView&) { std::cerr << text << "\n"; })
        .IgnoreError();
  }
  Stop(pids);
  std::cout << *job << " " << last.state << "\n";
  for (const auto& s : last.stages) {
    if (s.state == "SUCCEEDED")
      std::cout << "  " << s.name << ": " << (runs / *job / s.name).string() << "\n";
  }
  *exit_code = last.state == "SUCCEEDED" ? 0 : 1;
  return absl::OkStatus();
}

}  // namespace

int RunCommand(int argc, char** argv) {
  if (argc < 1 || argv[0][0] == '-') {
    std::cerr << "usage: sdctl run job.yaml [--workers N] [--threads N]\n";
    return 2;
  }
  int code = 1;
  absl::Status s = Run(argv[0], argc - 1, argv + 1, &code);
  if (!s.ok()) {
    std::cerr << "sdctl run: " << s.message() << "\n";
    return 1;
  }
  return code;
}

}  // namespace sdctl
