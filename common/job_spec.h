#pragma once
// job.yaml: the user's description of a compression job. Every variable of
// SD15_PIPELINE.md's run.sh is here with the same default (docs/job-yaml.md).
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sd {

// Stages in pipeline order. A job lists the stages it runs; the coordinator
// refuses any this build does not implement rather than skipping it.
const std::vector<std::string>& AllStageNames();
const std::vector<std::string>& ImplementedStageNames();
// What a job without a "stages" list runs: the compression pipeline (not the
// teacher-building stages init and train_vae).
const std::vector<std::string>& DefaultStageNames();

struct StageSpec {
  std::string name;
  int64_t workers = 1;       // data-parallel world size for this stage
  int64_t max_restarts = 3;  // restarts from the latest checkpoint before the job fails
};

struct JobSpec {
  std::string name = "sd15-compress";
  std::string model;    // diffusers folder of the teacher (required)
  std::string dataset;  // image folder with metadata.jsonl, or WebDataset shards
  std::string output = "output";
  int64_t seed = 0;
  int64_t checkpoint_interval = 100;  // steps between checkpoints
  int64_t batch_size = 1;             // per worker
  // Data pipeline (data:)
  bool center_crop = true;       // false: random crop
  bool random_flip = false;      // off by default: captions may say "left"/"right"
  double caption_dropout = 0.0;  // empty-caption probability, for classifier-free guidance
  // Samples that cannot be used (bad metadata lines, missing or undecodable images)
  // are always reported; a stage fails when more than this fraction is skipped.
  double max_skipped_fraction = 0.01;
  // When checkpoints exist but none is valid: false fails the stage with the reasons,
  // true trains again from step 0.
  bool allow_restart_from_zero = false;
  // Building a teacher from scratch (init:, train_vae:)
  std::string clip_bpe = "auto";  // CLIP merges file for a tokenizer/ that has no vocab
  int64_t vae_steps = 2000;
  double vae_lr = 1e-4;
  int64_t vae_batch_size = 0;  // 0: batch_size
  double vae_kl_weight = 1e-6;
  // Pixel weight 1 + w * d / max d, d = |x - the image's median color|
  // (sd/train/foreground_weights.h).
  double vae_foreground_weight = 0;
  std::string vae_lr_scheduler = "constant";  // after warm-up: constant, cosine or linear
  // Distillation (STEPS, CLIP_DISTILL_STEPS, LR, EMA_DECAY, PROGRESSIVE_STAGES)
  int64_t steps = 800;
  int64_t clip_distill_steps = 400;
  double lr = 1e-5;
  double ema_decay = 0.9999;
  std::vector<int64_t> progressive_stages = {50, 25, 12, 6};
  // Pruning (PRUNE_RATIO, TEXT_ENCODER_PRUNE_RATIO, VAE_PRUNE_RATIO)
  double prune_ratio = 0.3;
  double text_encoder_prune_ratio = 0.25;
  double vae_prune_ratio = 0.2;
  // Fine-tuning (FINETUNE_STEPS, FINETUNE_LR)
  int64_t finetune_steps = 200;
  double finetune_lr = 5e-6;
  bool finetune_ema = false;                       // keep an EMA of the weights
  double finetune_ema_decay = -1;                  // -1: ema_decay
  int64_t lr_warmup_steps = -1;                    // -1: min(500, steps / 10)
  std::string finetune_lr_scheduler = "constant";  // after warm-up: constant, cosine or linear
  bool finetune_text_encoder = false;              // train the text encoder with the UNet
  bool finetune_token_embedding = true;  // with train_text_encoder; false: its token table frozen
  bool finetune_cache_latents = false;   // encode each image once (needs a deterministic transform)
  double finetune_foreground_weight = 0;  // latent weight 1 + w * d / max d, as train_vae's
  double finetune_snr_gamma = 0;          // > 0: Min-SNR-gamma loss weighting (MinSnrWeights)
  std::string finetune_timestep_sampling = "uniform";  // or logit_normal (SampleTimestep)
  double finetune_logit_mean = 0;
  double finetune_logit_std = 1;
  double max_grad_norm = 1.0;
  std::string mixed_precision = "no";  // "no" or "bf16" (autocast on CUDA; fp32 master weights)
  // Optimization and quantization (TOME_RATIO, INT8_CALIBRATION_SAMPLES)
  double tome_ratio = 0.5;
  int64_t int8_calibration_samples = 100;

  std::vector<StageSpec> stages;
};

// Larger job files are refused with a clear error (not gRPC's message limit).
inline constexpr size_t kMaxJobFileBytes = 1 << 20;

// Parses and validates. Errors name the file, the line and the key, and suggest the
// nearest known key for a misspelt one. `origin` is the file name used in messages.
absl::StatusOr<JobSpec> ParseJobSpec(const std::string& yaml_text, const std::string& origin);
absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path);

// The number of steps `stage` runs under this job (for progress); 0 when unknown.
int64_t StageTotalSteps(const JobSpec& job, const std::string& stage);

}  // namespace sd
