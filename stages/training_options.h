#pragma once
// Options every training stage reads the same way (no LibTorch).
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "common/yaml_reader.h"

namespace sd::stages {

// What every training stage's section starts with: steps, lr, and lr_scheduler
// (one of diffusers' names that the training loop implements).
inline absl::Status ReadStepsAndLr(SectionReader& r, int64_t& steps, double& lr,
                                   std::string& lr_scheduler) {
  if (absl::Status s = r.Int("steps", steps, 1, 1e9); !s.ok()) return s;
  if (absl::Status s = r.Number("lr", lr, 0, 1, true); !s.ok()) return s;
  return r.OneOf("lr_scheduler", lr_scheduler, {"constant", "cosine", "linear"});
}

}  // namespace sd::stages
