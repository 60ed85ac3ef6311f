#pragma once
// Structured pruning of the three SD components, each described as a
// ChannelGraph from its config: the UNet and the VAE by whole channels per block
// (diffusers' configs hold one width per block: block_out_channels), the CLIP
// text encoder by MLP neurons (intermediate_size). The result is a standard
// component: its config.json with the new widths, weights in the same names.
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "sd/io/safetensors.h"

namespace sd::prune {

struct PrunedComponent {
  nlohmann::json config;  // the input's config.json with the new widths
  safetensors::TensorMap weights;
  nlohmann::json map;       // tensor -> {axis: kept indices}, for pruning_map.json
  nlohmann::json report;    // widths before/after per block, parameters, GroupNorms, refits
  nlohmann::json features;  // UNet: block output -> kept channels (feature distillation)
};

// `ratio` is the share of channels to remove (UNet and VAE: one for every
// block_out_channels level, or one per level); the share reached per block is
// reported (GroupNorm groups and attention heads quantise it). Errors name the
// block when a ratio would empty a group, and the tensor when weights and config
// disagree.
absl::StatusOr<PrunedComponent> PruneUNet(const nlohmann::json& config,
                                          const safetensors::TensorMap& weights,
                                          const std::vector<double>& ratio,
                                          const std::string& origin);
absl::StatusOr<PrunedComponent> PruneVAE(const nlohmann::json& config,
                                         const safetensors::TensorMap& weights,
                                         const std::vector<double>& ratio,
                                         const std::string& origin);
absl::StatusOr<PrunedComponent> PruneTextEncoder(const nlohmann::json& config,
                                                 const safetensors::TensorMap& weights,
                                                 double ratio, const std::string& origin);

}  // namespace sd::prune
