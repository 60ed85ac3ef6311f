#pragma once
#include <string>
namespace sdctl {
int GenerateCommand(int argc, char** argv);
// submit, status, list, cancel, workers, logs
int JobsCommand(const std::string& cmd, int argc, char** argv);
// run job.yaml: embedded coordinator + local workers
int RunCommand(int argc, char** argv);
}  // namespace sdctl
