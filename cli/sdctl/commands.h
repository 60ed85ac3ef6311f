#pragma once
namespace sdctl {
int GenerateCommand(int argc, char** argv);
}  // namespace sdctl
