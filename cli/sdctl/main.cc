// sdctl: the user's entry point. Subcommands stay thin; the work is in sdcore.
#include <cstring>
#include <iostream>
#include <string>

#include "cli/flags/inference_flags.h"
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
         "             [--threads N] [inference flags]\n"
         "  dataset    synth --out DIR [--count N] [--seed S] [--split train|heldout] ...: the "
         "toy\n"
         "             world's captioned shapes (image folder or WebDataset shards)\n"
         "  probe      train --data DIR --out FILE [--heldout DIR]: the toy world's attribute "
         "classifier\n"
         "  eval       --model DIR [--reference DIR] --prompts DIR --probe FILE --out DIR [--steps "
         "50]\n"
         "             [--reference-steps 50] [--guidance 7.5] [--count 100] [--seeds-per-prompt "
         "2]: "
         "fidelity,\n"
         "             prompt accuracy, diversity, size and latency; eval.json + grid.png\n"
         "             [inference flags]: the candidate runs with them, the reference without\n"
         "  run        job.yaml: the whole job on this machine (embedded coordinator + workers)\n"
         "  submit     job.yaml; status JOB; list; logs JOB [-f]; cancel JOB; resume JOB; "
         "workers\n\n"
         "inference flags (generate, eval):\n"
      << sdcli::InferenceFlagsUsage();
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
  if (cmd == "dataset") return sdctl::DatasetCommand(argc - 2, argv + 2);
  if (cmd == "probe") return sdctl::ProbeCommand(argc - 2, argv + 2);
  if (cmd == "eval") return sdctl::EvalCommand(argc - 2, argv + 2);
  if (cmd == "submit" || cmd == "status" || cmd == "list" || cmd == "cancel" || cmd == "resume" ||
      cmd == "workers" || cmd == "logs") {
    return sdctl::JobsCommand(cmd, argc - 2, argv + 2);
  }
  std::cerr << "sdctl: unknown command \"" << cmd << "\"\n";
  Usage();
  return 2;
}
