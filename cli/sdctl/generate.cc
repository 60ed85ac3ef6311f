#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/flags/inference_flags.h"
#include "cli/sdctl/commands.h"
#include "common/args.h"
#include "sd/image/png_image.h"
#include "sd/io/safetensors.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sdctl {
namespace {

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(
      Args args, Args::Parse(argc, argv,
                             sdcli::Concat({"model", "negative-prompt", "steps", "guidance", "seed",
                                            "scheduler", "out", "out-dir", "prompts-file", "height",
                                            "width", "images-per-prompt", "device", "dtype",
                                            "latents", "threads", "unet"},
                                           sdcli::InferenceValueFlags()),
                             {"prompt", "lora"}, sdcli::InferenceSwitches()));
  if (!args.Has("model")) return absl::InvalidArgumentError("--model DIR is required");
  sd::GenerateOptions o;
  o.prompts = args.All("prompt");
  if (args.Has("prompts-file")) {
    std::ifstream in(args.Get("prompts-file"));
    if (!in)
      return absl::NotFoundError(
          absl::StrCat("cannot open --prompts-file ", args.Get("prompts-file")));
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) o.prompts.push_back(line);
    }
  }
  if (o.prompts.empty())
    return absl::InvalidArgumentError("give at least one --prompt or a --prompts-file");
  if (args.Has("negative-prompt"))
    o.negative_prompts.assign(o.prompts.size(), args.Get("negative-prompt"));
  // A distilled model samples at the step count it learned unless told otherwise.
  const int64_t distilled = sd::DistilledSteps(args.Get("model"));
  ASSIGN_OR_RETURN(o.steps, args.Int("steps", distilled > 0 ? distilled : 50));
  ASSIGN_OR_RETURN(o.guidance_scale, args.Double("guidance", 7.5));
  ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  o.scheduler = args.Get("scheduler", "default");
  ASSIGN_OR_RETURN(o.height, args.Int("height", 0));
  ASSIGN_OR_RETURN(o.width, args.Int("width", 0));
  ASSIGN_OR_RETURN(o.images_per_prompt, args.Int("images-per-prompt", 1));
  ASSIGN_OR_RETURN(o.inference, sdcli::ParseInferenceFlags(args));
  ASSIGN_OR_RETURN(int64_t threads, args.Int("threads", 0));
  if (threads > 0) torch::set_num_threads(static_cast<int>(threads));
  const int64_t total = static_cast<int64_t>(o.prompts.size()) * o.images_per_prompt;
  if (total > 1 && !args.Has("out-dir"))
    return absl::InvalidArgumentError("several images: use --out-dir DIR");
  if (total == 1 && !args.Has("out") && !args.Has("out-dir"))
    return absl::InvalidArgumentError("--out FILE.png is required");

  ASSIGN_OR_RETURN(sd::StableDiffusion::LoadOptions load, sdcli::ParseModelLoadFlags(args));
  if (args.Has("latents")) {
    ASSIGN_OR_RETURN(sd::safetensors::File f, sd::safetensors::File::Open(args.Get("latents")));
    if (f.tensors().size() != 1)
      return absl::InvalidArgumentError(
          absl::StrCat(args.Get("latents"), ": expected exactly one tensor"));
    ASSIGN_OR_RETURN(o.latents, f.Get(f.tensors()[0].name, torch::kFloat32));
  }

  auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(sd::StableDiffusion model, sd::StableDiffusion::Load(args.Get("model"), load));
  auto t1 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "loaded %s in %.1fs\n", args.Get("model").c_str(),
               std::chrono::duration<double>(t1 - t0).count());
  for (const std::string& n : model.notes) std::fprintf(stderr, "%s\n", n.c_str());
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  o.on_step = [t1, tty](int64_t step, int64_t steps) {
    // A live line on a terminal; in logs, a line per 10% so they stay readable.
    if (!tty && step != steps && step % std::max<int64_t>(1, steps / 10) != 0) return;
    double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    std::fprintf(stderr, "%sstep %lld/%lld  %.2f it/s  eta %.0fs%s", tty ? "\r" : "",
                 static_cast<long long>(step), static_cast<long long>(steps), step / el,
                 (steps - step) * el / step, tty ? "   " : "\n");
    if (tty && step == steps) std::fprintf(stderr, "\n");
  };

  ASSIGN_OR_RETURN(torch::Tensor images, sd::Generate(model, o));
  if (total == 1 && args.Has("out")) {
    RETURN_IF_ERROR(sd::WritePng(args.Get("out"), images[0]));
    std::cout << args.Get("out") << "\n";
    return absl::OkStatus();
  }
  const std::string dir = args.Get("out-dir");
  std::filesystem::create_directories(dir);
  for (int64_t i = 0; i < images.size(0); ++i) {
    std::string path = (std::filesystem::path(dir) / absl::StrFormat("%04d.png", i)).string();
    RETURN_IF_ERROR(sd::WritePng(path, images[i]));
    std::cout << path << "\n";
  }
  return absl::OkStatus();
}

}  // namespace

int GenerateCommand(int argc, char** argv) {
  absl::Status s = Run(argc, argv);
  if (!s.ok()) {
    std::cerr << "sdctl generate: " << s.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace sdctl
