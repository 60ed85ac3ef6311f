#pragma once
// Options of the progressive_distillation stage (job.yaml section
// `progressive_distillation:`); names as the keys, defaults the seed's run.sh.
#include <cstdint>
#include <string>
#include <vector>

namespace sd::stages {

struct ProgressiveDistillationOptions {
  // PROGRESSIVE_STAGES: the teacher's step count, then each student's. Phase k
  // trains a student of stages[k] steps on the model of stages[k-1] steps.
  std::vector<int64_t> progressive_stages = {50, 25, 12, 6};
  int64_t steps = 800;                    // STEPS, per phase
  double lr = 1e-5;                       // LR
  std::string lr_scheduler = "constant";  // per phase, after its warm-up
  int64_t lr_warmup_steps = 0;            // per phase
  double max_grad_norm = 1.0;
  bool ema = true;            // the result (and the next phase's teacher) is the EMA
  double ema_decay = 0.9999;  // EMA_DECAY
  bool ema_warmup = true;     // diffusers' warm-up: min(ema_decay, 1 - (1 + t)^(-2/3))
  // The student's DDIM spacing (written into the result's scheduler config):
  // trailing starts from t = T - 1 (pure noise under a zero-terminal-SNR
  // schedule); leading keeps the teacher's steps_offset.
  std::string timestep_spacing = "trailing";
  // Weight of the attention-map loss (KL of each of the student's self- and
  // cross-attention maps from the teacher's on the same input); 0: off.
  double attention_weight = 0;
  bool cache_latents = false;          // as finetune's (a deterministic transform)
  std::string mixed_precision = "no";  // "no" or "bf16" (CUDA autocast)
  bool keep_phase_models = false;      // each phase's student as a model folder in artifacts
  // For a CFG-distilled input only (guidance first, as Meng et al. order it):
  // the guidance scales the phases are distilled at, uniform per sample.
  std::vector<double> guidance_range;
};

}  // namespace sd::stages
