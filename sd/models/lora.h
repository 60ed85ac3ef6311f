#pragma once
// LoRA files as people have them, applied to our models: kohya's
// (lora_unet_<module>.lora_down/lora_up/alpha, lora_te_ for the text encoder) and
// diffusers/PEFT's (unet.<module>.lora_A/lora_B, alpha in the file's
// lora_adapter_metadata, else alpha = rank as diffusers assumes). Keys map to
// modules through a table of the model's own module names (kohya's underscored
// names are looked up, never guessed back into dots), and a pruned model gets
// each update cut to the channels it kept (pruning_map.json): exact for them.
#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace sd {

struct LoraSpec {
  std::string path;
  double scale = 1.0;
};
// "FILE" or "FILE:SCALE".
absl::StatusOr<LoraSpec> ParseLoraSpec(const std::string& s);

// component ("unet", "text_encoder") -> module name -> its weight's shape.
using ModuleTable = std::map<std::string, std::map<std::string, std::vector<int64_t>>>;
// Every Linear and Conv2d weight of `m` (named "<module>.weight", 2-D or 4-D).
void AddModules(const std::string& component, torch::nn::Module& m, ModuleTable* table);

struct LoraUpdate {
  std::string component, module;
  std::string key;         // the file's down (lora_A) key, for reports
  torch::Tensor down, up;  // float32 on CPU: [r, in(, kh, kw)], [out, r(, 1, 1)]
  double alpha = 0;        // the update is alpha / rank * up @ down
  bool remapped = false;   // cut to a pruned model's channels
  int64_t rank() const { return down.size(0); }
};

struct LoraFile {
  std::string path;
  std::string format;  // "kohya" or "peft"
  std::vector<LoraUpdate> updates;
  // Keys that name no module of the table, or that are no low-rank update
  // (DoRA magnitudes, a down without its up), with the reason.
  std::vector<std::pair<std::string, std::string>> unmappable;
};

// `names`: the modules keys may name (the model's, or the unpruned model's when
// the LoRA was made for it).
absl::StatusOr<LoraFile> ReadLora(const std::string& path, const ModuleTable& names);

// Cuts every update whose module was pruned to the kept channels: down's input
// columns, up's output rows, times the query scale where the pruning rescaled
// to_q. An update on a refitted tensor (the time embedding) becomes unmappable.
absl::Status RemapToPruned(LoraFile& lora, const nlohmann::json& pruning_map);

struct LoraFit {
  std::vector<size_t> fit;  // indices into updates that apply as they are
  std::vector<std::pair<std::string, std::string>> missing;     // module absent here
  std::vector<std::pair<std::string, std::string>> mismatched;  // shapes, both named
};
LoraFit CheckLora(const LoraFile& lora, const ModuleTable& target);

// W += scale * alpha / rank * up @ down for the updates in `fit` that belong to
// `component`. `m` must have its unfused layout (before fuse_qkv_projections).
absl::Status ApplyLora(const LoraFile& lora, const LoraFit& fit, const std::string& component,
                       torch::nn::Module& m, double scale);

}  // namespace sd
