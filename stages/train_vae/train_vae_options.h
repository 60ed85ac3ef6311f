#pragma once
// Options of the train_vae stage (job.yaml section `train_vae:`).
#include <cstdint>
#include <string>

namespace sd::stages {

struct TrainVaeOptions {
  int64_t steps = 2000;
  double lr = 1e-4;
  std::string lr_scheduler = "constant";  // after a warm-up of min(100, steps / 10)
  int64_t batch_size = 0;                 // per worker; 0: the job's batch_size
  double kl_weight = 1e-6;
  // Pixel weight 1 + w * d / max d, d = |x - the image's median color|
  // (sd/train/foreground_weights.h).
  double foreground_weight = 0;
  double max_grad_norm = 1.0;
};

}  // namespace sd::stages
