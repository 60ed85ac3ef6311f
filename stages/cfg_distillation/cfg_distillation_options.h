#pragma once
// Options of the cfg_distillation stage (job.yaml section `cfg_distillation:`).
#include <cstdint>
#include <string>
#include <vector>

#include "stages/training_options.h"

namespace sd::stages {

struct CfgDistillationOptions {
  StudentTraining train;
  // Guidance scales w the student learns, drawn uniformly per sample; it then
  // runs at any w in the range with one UNet pass per step.
  std::vector<double> guidance_range = {2, 14};
  int64_t guidance_embedding_dim = 256;  // the UNet's time_cond_proj_dim (LCM's 256)
};

}  // namespace sd::stages
