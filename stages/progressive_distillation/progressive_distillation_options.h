#pragma once
// Options of the progressive_distillation stage (job.yaml section
// `progressive_distillation:`); names as the keys, defaults the seed's run.sh.
#include <cstdint>
#include <string>
#include <vector>

#include "stages/training_options.h"

namespace sd::stages {

struct ProgressiveDistillationOptions {
  // PROGRESSIVE_STAGES: the teacher's step count, then each student's. Phase k
  // trains a student of stages[k] steps on the model of stages[k-1] steps.
  std::vector<int64_t> progressive_stages = {50, 25, 12, 6};
  StudentTraining train;  // steps, lr, schedule and warm-up are per phase
  // The student's DDIM spacing (written into the result's scheduler config):
  // trailing starts from t = T - 1 (pure noise under a zero-terminal-SNR
  // schedule); leading keeps the teacher's steps_offset.
  std::string timestep_spacing = "trailing";
  // Weight of the attention-map loss (KL of each of the student's self- and
  // cross-attention maps from the teacher's on the same input); 0: off.
  double attention_weight = 0;
  bool keep_phase_models = false;  // each phase's student as a model folder in artifacts
  // For a CFG-distilled input only (guidance first, as Meng et al. order it):
  // the guidance scales the phases are distilled at, uniform per sample.
  std::vector<double> guidance_range;
  // > 0: the target is the guided teacher's: two DDIM steps of
  // uncond + w (cond - uncond) at w = guided_scale, and what must land there is
  // the student's own guided output (its conditional and unconditional passes,
  // combined the same way). The student is then distilled for sampling at that
  // scale (two passes per step still); 0: cond and uncond are learned apart.
  double guided_scale = 0;
};

}  // namespace sd::stages
