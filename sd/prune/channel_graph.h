#pragma once
// Dependency-aware structured pruning over a state dict. A model is described as
// channel spaces ("streams"): every tensor axis that must keep the same channels
// (a conv's output, the residual stream it is added to, the norms and the inputs
// that read it) names one stream, or a concatenation of streams (skip
// connections, GEGLU's two halves). Selecting channels per stream and cutting
// every axis by its streams' kept indices keeps every tensor consistent.
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "sd/io/safetensors.h"

namespace sd::prune {

class ChannelGraph {
 public:
  // A stream of `width` channels in `groups` equal groups (GroupNorm's groups or
  // attention heads; 1 when nothing groups it) of which `keep_per_group` are kept
  // in each group, so every new group is a subset of one old group.
  int AddStream(std::string name, int64_t width, int64_t groups, int64_t keep_per_group);
  // Axis `axis` of `tensor` is the concatenation of `streams`, in order.
  void Use(const std::string& tensor, int64_t axis, std::vector<int> streams);
  void Use(const std::string& tensor, int64_t axis, int stream) {
    Use(tensor, axis, std::vector<int>{stream});
  }
  // Weight and bias of a norm over `stream`.
  void UseNorm(const std::string& module, int stream);
  // A GroupNorm of `groups` groups over the concatenation of `streams`: its group
  // boundaries split selection further so that, when every stream keeps the same
  // share, its new groups are subsets of its old ones too.
  void GroupNorm(const std::string& module, std::vector<int> streams, int64_t groups);

  int64_t width(int stream) const { return streams_[stream].width; }
  int64_t kept_width(int stream) const { return streams_[stream].groups * streams_[stream].keep; }
  const std::vector<int64_t>& kept(int stream) const { return streams_[stream].kept; }

  // Chooses each stream's channels by L1 importance summed over every tensor
  // slice it owns (each tensor's share normalised by its mean, so large and small
  // tensors count alike). Errors name the tensor when `weights` lack one or an
  // axis is not the streams' width.
  absl::Status Select(const safetensors::TensorMap& weights, const std::string& component);
  // The pruned state dict: every used axis cut to its kept channels, every other
  // tensor as it was.
  absl::StatusOr<safetensors::TensorMap> Apply(const safetensors::TensorMap& weights) const;
  // pruning_map.json's entry: tensor -> {axis: kept indices} for every pruned axis.
  nlohmann::json Map() const;
  // Per GroupNorm: old and new channels and groups, and how many new groups are
  // not a subset of one old group (0 when its streams keep the same share).
  nlohmann::json GroupNormReport() const;

 private:
  struct Stream {
    std::string name;
    int64_t width = 0, groups = 1, keep = 0;
    std::vector<int64_t> kept;
  };
  struct Use_ {
    std::string tensor;
    int64_t axis = 0;
    std::vector<int> streams;
  };
  struct Norm {
    std::string module;
    std::vector<int> streams;
    int64_t groups = 1;
  };
  // The kept indices of a concatenation of streams, in the concatenated axis.
  std::vector<int64_t> ConcatKept(const std::vector<int>& streams) const;
  int64_t ConcatWidth(const std::vector<int>& streams) const;

  std::vector<Stream> streams_;
  std::vector<Use_> uses_;
  std::vector<Norm> norms_;
};

// Kept channels per group: round(size * (1 - ratio)), at least 1.
int64_t KeepPerGroup(int64_t group_size, double ratio);

}  // namespace sd::prune
