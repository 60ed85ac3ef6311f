#pragma once
// A worker that dies of a signal (a crash in LibTorch, a bad model config, a
// SIGSEGV sent by someone) cannot send Finish. Its last words go to a file on
// shared storage instead, which the coordinator reads when the worker's
// heartbeats stop, so the stage's error says what happened, not only "missed
// heartbeats".
#include <string>

namespace sd::worker {

// Once per process: handlers for SIGSEGV, SIGFPE, SIGBUS, SIGILL and SIGABRT.
void InstallCrashHandler(const std::string& worker_id);
// The task now running and where its report goes ("" when idle: nothing is written).
void SetCrashContext(const std::string& task_id, const std::string& report_path);
// The latest line worth leaving behind (progress, the stage's last event).
void SetLastWords(const std::string& line);

}  // namespace sd::worker
