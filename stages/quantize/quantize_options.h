#pragma once
// Options of the quantize stage (job.yaml section `quantize:`).
#include <string>

namespace sd::stages {

struct QuantizeOptions {
  // The floating-point precision of every component's weights: fp16 (the
  // seed's default, "2x memory reduction") or bf16 (fp32's range, for CPUs and
  // for models whose activations overflow fp16).
  std::string dtype = "fp16";
};

}  // namespace sd::stages
