#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Progressive distillation (Salimans & Ho 2022) of the input model's UNet, one
// phase per halving of progressive_stages: the student, initialised from its
// teacher, learns to take in one DDIM step what the teacher takes in two, and
// its EMA becomes the next phase's teacher. docs/architecture.md
// "progressive_distillation" says how the timesteps, targets and phases work.
class ProgressiveDistillationStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
