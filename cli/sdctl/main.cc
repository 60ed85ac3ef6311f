// sdctl: the user's entry point. Subcommands stay thin; the work is in sdcore.
#include <cstring>
#include <iostream>
#include <string>

#include "cli/sdctl/commands.h"

namespace {
void Usage() {
  std::cerr
      << "usage: sdctl <command> [flags]\n\n"
         "commands:\n"
         "  generate   text-to-image with a diffusers-layout SD1.5 model\n"
         "             --model DIR --prompt TEXT [--prompt TEXT ...] [--negative-prompt TEXT]\n"
         "             [--steps 50] [--guidance 7.5] [--seed 0] [--scheduler "
         "default|ddim|euler|dpm++2m|pndm]\n"
         "             [--height H --width W] [--images-per-prompt 1] [--device cpu|cuda] [--dtype "
         "fp32|fp16|bf16]\n"
         "             [--prompts-file FILE] (--out FILE.png | --out-dir DIR) [--latents "
         "FILE.safetensors]\n"
         "             [--threads N] [--vae-slicing]\n";
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "help") == 0) {
    Usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "generate") return sdctl::GenerateCommand(argc - 2, argv + 2);
  if (cmd == "run") return sdctl::RunCommand(argc - 2, argv + 2);
  if (cmd == "submit" || cmd == "status" || cmd == "list" || cmd == "cancel" || cmd == "workers" ||
      cmd == "logs") {
    return sdctl::JobsCommand(cmd, argc - 2, argv + 2);
  }
  std::cerr << "sdctl: unknown command \"" << cmd << "\"\n";
  Usage();
  return 2;
}
