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

// A checkpoint opened but not read: a .safetensors file, a sharded checkpoint given
// by its *.safetensors.index.json, or tensors already in memory. Model loaders
// fetch tensors one at a time, so at most one tensor's worth is ever duplicated.
class Checkpoint {
 public:
  static absl::StatusOr<Checkpoint> Open(const std::string& path);
  static Checkpoint FromTensors(TensorMap tensors, std::string origin);

  std::vector<std::string> names() const;
  bool Has(const std::string& name) const { return where_.count(name) > 0; }
  std::vector<int64_t> Shape(const std::string& name) const;
  // copy=false: zero-copy alias of the mapping; copy=true: a private copy, and the
  // mapped pages are released right away.
  absl::StatusOr<torch::Tensor> Fetch(const std::string& name, bool copy,
                                      std::optional<torch::Dtype> dtype = std::nullopt) const;
  const std::string& origin() const { return origin_; }

 private:
  std::string origin_;
  std::vector<File> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_ (or SIZE_MAX: in memory)
  TensorMap memory_;
};

// Loads every tensor (zero-copy where the dtype matches).
absl::StatusOr<TensorMap> Load(const std::string& path,
                               std::optional<torch::Dtype> dtype = std::nullopt);

// Writes one file atomically. Tensors are written contiguous, on CPU, in name order.
absl::Status Save(const std::string& path, const TensorMap& tensors, const Metadata& metadata = {});

// Writes shards of at most `max_shard_bytes` (a tensor larger than that gets a
// shard of its own) named <stem>-0000i-of-0000n.safetensors plus
// <stem>.safetensors.index.json, each atomically, the index last. Returns the index path.
absl::StatusOr<std::string> SaveSharded(const std::string& dir, const std::string& stem,
                                        const TensorMap& tensors, size_t max_shard_bytes,
                                        const Metadata& metadata = {});

}  // namespace sd::safetensors
