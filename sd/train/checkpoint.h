#pragma once
// Training checkpoints on shared storage. Each is a directory step-NNNNNNNN/ with
// safetensors files and a manifest.json holding the training state and a CRC32 of
// every file. It is written under a temporary name and renamed into place, so a
// directory with that name is always complete; a checkpoint that is truncated or
// corrupted later fails its checksums and the previous one is used.
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/io/safetensors.h"

namespace sd {

struct TrainingCheckpoint {
  int64_t step = 0;
  std::string dir;
  nlohmann::json state;                                   // step, data cursor, RNG, ...
  std::map<std::string, safetensors::TensorMap> tensors;  // file stem -> tensors
};

// Writes root/step-<step>/ and keeps the newest `keep` checkpoints.
absl::Status WriteCheckpoint(const std::string& root, const TrainingCheckpoint& ckpt, int keep = 2);

// The newest checkpoint whose manifest and checksums verify and that `accept`
// (the trainer's own check: every tensor it needs, of the right shape) takes, or
// nullopt when there is none. Each one passed over is described in *skipped
// (path and reason), newest first.
absl::StatusOr<std::optional<TrainingCheckpoint>> LoadLatestCheckpoint(
    const std::string& root, std::vector<std::string>* skipped,
    const std::function<absl::Status(const TrainingCheckpoint&)>& accept = {});

// Removes the temporary folders of checkpoint writes that were cut short (a
// killed writer leaves .tmp-step-*); returns their paths.
std::vector<std::string> RemoveUnfinishedCheckpoints(const std::string& root);

}  // namespace sd
