#pragma once
// safetensors reading (mmap, zero-copy when the stored dtype is the one asked for)
// and atomic writing, including sharded checkpoints with an index.json.
#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/util/mmap_file.h"

namespace sd::safetensors {

using TensorMap = std::map<std::string, torch::Tensor>;
using Metadata = std::map<std::string, std::string>;

struct TensorInfo {
  std::string name;
  torch::Dtype dtype;
  std::vector<int64_t> shape;
  size_t begin = 0;  // byte offsets relative to the data section
  size_t end = 0;
};

absl::StatusOr<torch::Dtype> ParseDtype(const std::string& s);
absl::StatusOr<std::string> DtypeName(torch::Dtype dtype);

// One .safetensors file, header validated on open.
class File {
 public:
  static absl::StatusOr<File> Open(const std::string& path);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const Metadata& metadata() const { return metadata_; }
  const std::string& path() const { return map_->path(); }
  const TensorInfo* Find(const std::string& name) const;

  // Returns the tensor, converted to `dtype` when given. Without conversion the
  // tensor aliases the (copy-on-write) mapping; it stays valid after File is gone.
  absl::StatusOr<torch::Tensor> Get(const std::string& name,
                                    std::optional<torch::Dtype> dtype = std::nullopt) const;
  // A private copy of the tensor; the mapped pages it came from are released.
  absl::StatusOr<torch::Tensor> Take(const std::string& name,
                                     std::optional<torch::Dtype> dtype = std::nullopt) const;

 private:
  std::shared_ptr<MappedFile> map_;
  size_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  Metadata metadata_;
};

// Loads every tensor of a checkpoint: a .safetensors file, or a sharded checkpoint
// given by its *.safetensors.index.json. By default tensors alias the mapping
// (zero-copy); with `copy` each is copied out and its pages released at once, so
// peak memory stays at one copy of the weights (for callers that re-layout them).
absl::StatusOr<TensorMap> Load(const std::string& path,
                               std::optional<torch::Dtype> dtype = std::nullopt, bool copy = false);

// Writes one file atomically. Tensors are written contiguous, on CPU, in name order.
absl::Status Save(const std::string& path, const TensorMap& tensors, const Metadata& metadata = {});

// Writes shards of at most `max_shard_bytes` (a tensor larger than that gets a
// shard of its own) named <stem>-0000i-of-0000n.safetensors plus
// <stem>.safetensors.index.json, each atomically, the index last. Returns the index path.
absl::StatusOr<std::string> SaveSharded(const std::string& dir, const std::string& stem,
                                        const TensorMap& tensors, size_t max_shard_bytes,
                                        const Metadata& metadata = {});

}  // namespace sd::safetensors
