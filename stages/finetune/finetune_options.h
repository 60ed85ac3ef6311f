#pragma once
// Options of the finetune stage (job.yaml section `finetune:`); names as the keys.
#include <cstdint>
#include <string>

namespace sd::stages {

struct FinetuneOptions {
  int64_t steps = 200;                    // FINETUNE_STEPS
  double lr = 5e-6;                       // FINETUNE_LR
  bool ema = false;                       // keep an EMA of the weights; the result is the EMA
  double ema_decay = 0.9999;              // EMA_DECAY
  int64_t lr_warmup_steps = -1;           // -1: min(500, steps / 10)
  std::string lr_scheduler = "constant";  // after warm-up: constant, cosine or linear
  double max_grad_norm = 1.0;
  std::string mixed_precision = "no";  // "no" or "bf16" (autocast on CUDA; fp32 master weights)
  bool train_text_encoder = false;     // train the text encoder with the UNet
  bool train_token_embedding = true;   // with train_text_encoder; false: its token table frozen
  bool cache_latents = false;          // encode each image once (needs a deterministic transform)
  double foreground_weight = 0;        // latent weight 1 + w * d / max d, as train_vae's
  double snr_gamma = 0;                // > 0: Min-SNR-gamma loss weighting (MinSnrWeights)
  std::string timestep_sampling = "uniform";  // or logit_normal (SampleTimestep)
  double logit_mean = 0;
  double logit_std = 1;
  // Knowledge distillation (BK-SDM's objective) from an unpruned teacher. "auto":
  // the model the input was pruned from (its pruning_map.json's source) when the
  // input is a pruned model, else none; "none": the task loss alone; or a path.
  std::string teacher = "auto";
  double task_weight = 1.0;        // the denoising loss
  double kd_output_weight = 1.0;   // MSE to the teacher's prediction
  double kd_feature_weight = 1.0;  // sum over down/mid/up blocks of the outputs' MSE
  // With a teacher, each pruned component recovers: the text encoder learns the
  // teacher's hidden states; the VAE decoder learns the images (task_weight) and
  // the teacher's decodings (kd_output_weight) of the teacher's latents.
  bool recover_text_encoder = true;
  bool recover_vae = true;
};

}  // namespace sd::stages
