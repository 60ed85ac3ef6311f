#pragma once
// The quality gate every compression stage is judged by: a candidate model and
// a reference model generate from the same prompts at the same seeds, and we
// report fidelity (PSNR and SSIM of the decoded images, latent MSE), prompt
// accuracy (the shape probe against the attributes each prompt asked for),
// diversity (1 - SSIM between seeds of one prompt), model size and latency.
#include <torch/torch.h>

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "sd/pipeline/stable_diffusion.h"

namespace sd::eval {

struct EvalOptions {
  std::string model;             // candidate (diffusers folder)
  bool model_unet_int8 = false;  // the candidate's UNet from its unet_int8.safetensors
  std::string reference;         // optional: the model it is compared with
  std::string prompts;           // dataset whose single-shape scenes give prompts + labels
  std::string probe;             // ShapeProbe weights (sdctl probe train)
  int64_t count = 100;           // prompts
  int64_t seeds_per_prompt = 2;  // >= 2 for diversity
  int64_t steps = 50;
  int64_t reference_steps = 50;
  double guidance = 7.5;
  int64_t seed = 0;
  int64_t batch = 16;
  std::string scheduler = "ddim";
  InferenceOptions inference;  // the candidate's (token merging, slicing, tiling)
  std::function<void(const std::string& what, int64_t done, int64_t total)> progress;
};

struct EvalResult {
  nlohmann::json report;
  torch::Tensor grid;  // [H, W, 3] float in [0, 1]: reference | candidate pairs
};

absl::StatusOr<EvalResult> Evaluate(const EvalOptions& o);

}  // namespace sd::eval
