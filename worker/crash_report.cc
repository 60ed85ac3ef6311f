#include "worker/crash_report.h"

#include <execinfo.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>

namespace sd::worker {
namespace {

// Fixed buffers: a signal handler may not allocate. A torn read of a line being
// rewritten only garbles the report, never the crash handling.
char g_worker[256];
char g_task[512];
char g_path[4096];
char g_words[2048];
std::atomic<bool> g_armed{false};

void Copy(char* dst, size_t n, const std::string& src) {
  const size_t len = std::min(n - 1, src.size());
  std::memcpy(dst, src.data(), len);
  dst[len] = '\0';
}

void Write(int fd, const char* s) {
  size_t len = std::strlen(s);
  while (len > 0) {
    const ssize_t n = ::write(fd, s, len);
    if (n <= 0) return;
    s += n;
    len -= static_cast<size_t>(n);
  }
}

void OnCrash(int sig) {
  if (g_armed.load() && g_path[0] != '\0') {
    const int fd = ::open(g_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      char head[128];
      // snprintf is not async-signal-safe in general; with %d and %s into a stack
      // buffer glibc's does not allocate.
      std::snprintf(head, sizeof(head), "signal %d (%s) ", sig, strsignal(sig));
      Write(fd, head);
      Write(fd, "while running ");
      Write(fd, g_task);
      Write(fd, " on worker ");
      Write(fd, g_worker);
      if (g_words[0] != '\0') {
        Write(fd, "; last words: ");
        Write(fd, g_words);
      }
      Write(fd, "\nbacktrace:\n");
      void* frames[48];
      const int n = ::backtrace(frames, 48);
      ::backtrace_symbols_fd(frames, n, fd);
      ::fsync(fd);
      ::close(fd);
    }
  }
  // SA_RESETHAND restored the default action: die of the same signal.
  ::raise(sig);
}

}  // namespace

void InstallCrashHandler(const std::string& worker_id) {
  Copy(g_worker, sizeof(g_worker), worker_id);
  void* warm[1];
  ::backtrace(warm, 1);  // loads libgcc now, not inside the handler
  struct sigaction sa {};
  sa.sa_handler = OnCrash;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGSEGV, SIGFPE, SIGBUS, SIGILL, SIGABRT}) ::sigaction(sig, &sa, nullptr);
}

void SetCrashContext(const std::string& task_id, const std::string& report_path) {
  g_armed = false;
  Copy(g_task, sizeof(g_task), task_id);
  Copy(g_path, sizeof(g_path), report_path);
  g_words[0] = '\0';
  g_armed = !report_path.empty();
}

void SetLastWords(const std::string& line) { Copy(g_words, sizeof(g_words), line); }

}  // namespace sd::worker
