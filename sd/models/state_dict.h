#pragma once
// Loading a checkpoint into a module by exact name match, with errors that name
// the tensor and both shapes.
#include <torch/torch.h>

#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "sd/io/safetensors.h"

namespace sd {

struct LoadOptions {
  // Checkpoint tensors that are not parameters and may be ignored (e.g. CLIP's position_ids).
  std::set<std::string> ignorable;
  // Old diffusers names mapped to current ones (e.g. VAE "query" -> "to_q").
  std::vector<std::pair<std::string, std::string>> renames;
  // Prepended to every checkpoint name that lacks it (transformers 5 drops "text_model.").
  std::string prefix;
  // Copy each tensor out of the file (releasing its pages) instead of aliasing it.
  bool copy = false;
};

// Assigns every parameter and buffer of `module` from the checkpoint, one tensor at
// a time; `config` names the config.json in error messages.
absl::Status LoadStateDict(torch::nn::Module& module, const safetensors::Checkpoint& checkpoint,
                           const std::string& config, const LoadOptions& options = {});
absl::Status LoadStateDict(torch::nn::Module& module, safetensors::TensorMap tensors,
                           const std::string& origin, const std::string& config,
                           const LoadOptions& options = {});

// FindWeights + Checkpoint::Open + LoadStateDict for a component folder.
absl::Status LoadComponentWeights(torch::nn::Module& module, const std::string& dir,
                                  const std::string& config, const LoadOptions& options = {});

// Finds the weights file of a diffusers/transformers component folder:
// (diffusion_pytorch_model|model).safetensors or its sharded index.json.
absl::StatusOr<std::string> FindWeights(const std::string& dir);

// The module's parameters and buffers by name, for saving in the same layout.
safetensors::TensorMap StateDict(const torch::nn::Module& module);

}  // namespace sd
