#pragma once
// job.yaml: the user's description of a compression job. JobSpec holds what every
// stage shares; each stage's own section is parsed by that stage's descriptor
// (stages/catalog.h, which also holds ParseJobSpec) into its options struct,
// kept here by stage name.
#include <any>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace sd {

// Larger job files are refused with a clear error (not gRPC's message limit).
inline constexpr size_t kMaxJobFileBytes = 1 << 20;

struct StageSpec {
  std::string name;
  int64_t workers = 1;       // data-parallel world size for this stage
  int64_t max_restarts = 3;  // restarts from the latest checkpoint before the job fails
};

struct JobSpec {
  std::string name = "sd15-compress";
  std::string model;    // diffusers folder of the teacher (required)
  std::string dataset;  // image folder with metadata.jsonl, or WebDataset shards
  std::string output = "output";
  int64_t seed = 0;
  int64_t checkpoint_interval = 100;  // steps between checkpoints
  int64_t batch_size = 1;             // per worker
  // When checkpoints exist but none is valid: false fails the stage with the reasons,
  // true trains again from step 0.
  bool allow_restart_from_zero = false;
  // Data pipeline (data:)
  bool center_crop = true;       // false: random crop
  bool random_flip = false;      // off by default: captions may say "left"/"right"
  double caption_dropout = 0.0;  // empty-caption probability, for classifier-free guidance
  // Samples that cannot be used (bad metadata lines, missing or undecodable images)
  // are always reported; a stage fails when more than this fraction is skipped.
  double max_skipped_fraction = 0.01;

  std::vector<StageSpec> stages;  // in pipeline order
  // Each catalog stage's options (its descriptor's type), defaults when its
  // section is absent.
  std::map<std::string, std::any> options;

  template <typename T>
  const T& Options(const std::string& stage) const {
    return std::any_cast<const T&>(options.at(stage));
  }
};

}  // namespace sd
