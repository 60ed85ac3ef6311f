#pragma once
#include "stages/stage.h"

namespace sd::stages {

// The input model in half precision: every floating-point weight of the text
// encoder, UNet and VAE in fp16 or bf16, under the plain file names (the folder
// is the half-precision model; see docs/architecture.md "Quantization"), plus
// quantization.json saying what was done.
class QuantizeStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
