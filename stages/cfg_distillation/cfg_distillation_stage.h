#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Classifier-free guidance distillation (Meng et al. 2023): a student whose
// output at (z_t, t, caption, w) matches the guided teacher
// uncond + w (cond - uncond), conditioned on w through diffusers' own
// time_cond_proj_dim (the guidance-scale embedding LCM uses), its projection
// zero-initialised so the student starts as the conditional teacher. It then
// samples with one UNet pass per step at any guidance scale it learned.
class CfgDistillationStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
