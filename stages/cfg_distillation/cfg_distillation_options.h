#pragma once
// Options of the cfg_distillation stage (job.yaml section `cfg_distillation:`).
#include <cstdint>
#include <string>
#include <vector>

namespace sd::stages {

struct CfgDistillationOptions {
  int64_t steps = 800;  // STEPS
  double lr = 1e-5;     // LR
  std::string lr_scheduler = "constant";
  int64_t lr_warmup_steps = 0;
  double max_grad_norm = 1.0;
  bool ema = true;
  double ema_decay = 0.9999;  // EMA_DECAY
  bool ema_warmup = true;
  // Guidance scales w the student learns, drawn uniformly per sample; it then
  // runs at any w in the range with one UNet pass per step.
  std::vector<double> guidance_range = {2, 14};
  int64_t guidance_embedding_dim = 256;  // the UNet's time_cond_proj_dim (LCM's 256)
  bool cache_latents = false;
  std::string mixed_precision = "no";
};

}  // namespace sd::stages
