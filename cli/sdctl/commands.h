#pragma once
#include <string>

#include "common/args.h"
namespace sdctl {

using sd::Args;
int GenerateCommand(int argc, char** argv);
// submit, status, list, cancel, workers, logs
int JobsCommand(const std::string& cmd, int argc, char** argv);
// run job.yaml: embedded coordinator + local workers
int RunCommand(int argc, char** argv);
// dataset synth
int DatasetCommand(int argc, char** argv);
// probe train; eval
int ProbeCommand(int argc, char** argv);
int EvalCommand(int argc, char** argv);
}  // namespace sdctl
