#pragma once
// Options every training stage reads the same way (no LibTorch).
#include <string>

#include "absl/status/status.h"
#include "common/yaml_reader.h"

namespace sd::stages {

// `lr_scheduler`: one of diffusers' names that the training loop implements.
inline absl::Status ReadLrScheduler(SectionReader& r, std::string& out) {
  return r.OneOf("lr_scheduler", out, {"constant", "cosine", "linear"});
}

}  // namespace sd::stages
