// sdctl probe train / sdctl eval: the toy world's judge and quality gate.
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/flags/inference_flags.h"
#include "cli/sdctl/commands.h"
#include "common/args.h"
#include "sd/eval/evaluate.h"
#include "sd/eval/shape_probe.h"
#include "sd/image/png_image.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sdctl {
namespace {
namespace fs = std::filesystem;

absl::Status SetThreads(const Args& args) {
  ASSIGN_OR_RETURN(int64_t threads, args.Int("threads", 0));
  if (threads > 0) torch::set_num_threads(static_cast<int>(threads));
  return absl::OkStatus();
}

// Accuracy of a probe on the single-shape scenes of a dataset.
absl::StatusOr<nlohmann::json> ProbeAccuracy(sd::eval::ShapeProbe& probe, const std::string& dir) {
  ASSIGN_OR_RETURN(sd::eval::LabeledScenes scenes,
                   sd::eval::LoadLabeledScenes(dir, INT64_MAX, true));
  const auto acc = sd::eval::Accuracy(sd::eval::Predict(probe, scenes.images), scenes.labels);
  nlohmann::json j = {{"dataset", dir}, {"images", scenes.labels.size(0)}};
  for (size_t k = 0; k < acc.size(); ++k) j["accuracy"][sd::eval::kProbeAttributes[k]] = acc[k];
  return j;
}

absl::Status ProbeTrain(int argc, char** argv) {
  ASSIGN_OR_RETURN(Args args, Args::Parse(argc, argv,
                                          {"data", "heldout", "out", "steps", "batch-size", "lr",
                                           "seed", "threads"}));
  if (!args.Has("data") || !args.Has("out"))
    return absl::InvalidArgumentError("--data DIR and --out FILE.safetensors are required");
  RETURN_IF_ERROR(SetThreads(args));
  sd::eval::ProbeTrainOptions o;
  ASSIGN_OR_RETURN(o.steps, args.Int("steps", o.steps));
  ASSIGN_OR_RETURN(o.batch_size, args.Int("batch-size", o.batch_size));
  ASSIGN_OR_RETURN(o.lr, args.Double("lr", o.lr));
  ASSIGN_OR_RETURN(o.seed, args.Int("seed", 0));
  ASSIGN_OR_RETURN(auto probe, sd::eval::TrainProbe(args.Get("data"), o, [&](int64_t s, double l) {
                     if (s % 100 == 0 || s == o.steps)
                       std::cerr << absl::StrFormat("probe step %d/%d loss %.4f\n", s, o.steps, l);
                   }));
  RETURN_IF_ERROR(sd::eval::SaveProbe(probe, args.Get("out")));
  nlohmann::json report = {
      {"probe", args.Get("out")}, {"train", args.Get("data")}, {"steps", o.steps}};
  if (args.Has("heldout")) {
    ASSIGN_OR_RETURN(report["heldout"], ProbeAccuracy(probe, args.Get("heldout")));
  }
  RETURN_IF_ERROR(sd::WriteFileAtomic(args.Get("out") + ".json", report.dump(2)));
  std::cout << report.dump(2) << "\n";
  return absl::OkStatus();
}

absl::Status ProbeEval(int argc, char** argv) {
  ASSIGN_OR_RETURN(Args args, Args::Parse(argc, argv, {"probe", "data", "threads"}));
  if (!args.Has("probe") || !args.Has("data"))
    return absl::InvalidArgumentError("--probe FILE and --data DIR are required");
  RETURN_IF_ERROR(SetThreads(args));
  ASSIGN_OR_RETURN(auto probe, sd::eval::LoadProbe(args.Get("probe")));
  ASSIGN_OR_RETURN(nlohmann::json report, ProbeAccuracy(probe, args.Get("data")));
  std::cout << report.dump(2) << "\n";
  return absl::OkStatus();
}

absl::Status Eval(int argc, char** argv) {
  ASSIGN_OR_RETURN(
      Args args,
      Args::Parse(argc, argv,
                  sdcli::Concat({"model", "reference", "prompts", "probe", "count",
                                 "seeds-per-prompt", "steps", "reference-steps", "guidance", "seed",
                                 "batch", "scheduler", "out", "threads", "unet"},
                                sdcli::InferenceValueFlags()),
                  {}, sdcli::InferenceSwitches()));
  for (const char* f : {"model", "prompts", "probe", "out"}) {
    if (!args.Has(f)) return absl::InvalidArgumentError(absl::StrCat("--", f, " is required"));
  }
  RETURN_IF_ERROR(SetThreads(args));
  sd::eval::EvalOptions o;
  o.model = args.Get("model");
  ASSIGN_OR_RETURN(sd::StableDiffusion::LoadOptions load, sdcli::ParseModelLoadFlags(args));
  o.model_unet_int8 = load.unet_int8;
  // The candidate runs with these; the reference as it is, so the report measures them.
  ASSIGN_OR_RETURN(o.inference, sdcli::ParseInferenceFlags(args));
  o.reference = args.Get("reference");
  o.prompts = args.Get("prompts");
  o.probe = args.Get("probe");
  ASSIGN_OR_RETURN(o.count, args.Int("count", o.count));
  ASSIGN_OR_RETURN(o.seeds_per_prompt, args.Int("seeds-per-prompt", o.seeds_per_prompt));
  ASSIGN_OR_RETURN(o.steps, args.Int("steps", o.steps));
  ASSIGN_OR_RETURN(o.reference_steps, args.Int("reference-steps", o.reference_steps));
  ASSIGN_OR_RETURN(o.guidance, args.Double("guidance", o.guidance));
  ASSIGN_OR_RETURN(o.seed, args.Int("seed", 0));
  ASSIGN_OR_RETURN(o.batch, args.Int("batch", o.batch));
  o.scheduler = args.Get("scheduler", o.scheduler);
  o.progress = [](const std::string& what, int64_t done, int64_t total) {
    std::cerr << "\r" << what << " " << done << "/" << total << std::flush;
    if (done == total) std::cerr << "\n";
  };
  ASSIGN_OR_RETURN(sd::eval::EvalResult r, sd::eval::Evaluate(o));
  const fs::path out(args.Get("out"));
  std::error_code ec;
  fs::create_directories(out, ec);
  RETURN_IF_ERROR(sd::WriteFileAtomic((out / "eval.json").string(), r.report.dump(2)));
  RETURN_IF_ERROR(sd::WritePng((out / "grid.png").string(), r.grid));
  std::cout << r.report.dump(2) << "\n";
  return absl::OkStatus();
}

int Report(const absl::Status& s, const char* what) {
  if (s.ok()) return 0;
  std::cerr << "sdctl " << what << ": " << s.message() << "\n";
  return 1;
}

}  // namespace

int ProbeCommand(int argc, char** argv) {
  const std::string sub = argc >= 1 ? argv[0] : "";
  if (sub == "train") return Report(ProbeTrain(argc - 1, argv + 1), "probe train");
  if (sub == "eval") return Report(ProbeEval(argc - 1, argv + 1), "probe eval");
  std::cerr << "usage: sdctl probe train --data DIR --out FILE.safetensors [--heldout DIR]\n"
               "                         [--steps 1500] [--batch-size 64] [--lr 2e-3] [--seed 0]\n"
               "       sdctl probe eval --probe FILE --data DIR   (accuracy on labeled images)\n";
  return 2;
}

int EvalCommand(int argc, char** argv) { return Report(Eval(argc, argv), "eval"); }

}  // namespace sdctl
