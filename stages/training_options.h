#pragma once
// Options every training stage reads the same way (no LibTorch).
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "common/yaml_reader.h"
#include "sd/util/status_macros.h"

namespace sd::stages {

// What every training stage's section starts with: steps, lr, and lr_scheduler
// (one of diffusers' names that the training loop implements).
inline absl::Status ReadStepsAndLr(SectionReader& r, int64_t& steps, double& lr,
                                   std::string& lr_scheduler) {
  if (absl::Status s = r.Int("steps", steps, 1, 1e9); !s.ok()) return s;
  if (absl::Status s = r.Number("lr", lr, 0, 1, true); !s.ok()) return s;
  return r.OneOf("lr_scheduler", lr_scheduler, {"constant", "cosine", "linear"});
}

// cache_latents keeps each image's first posterior: refused unless the transform
// is deterministic (random crops and flips would all get that one).
inline absl::Status ReadCacheLatents(SectionReader& r, const JobSpec& job, bool& cache_latents) {
  RETURN_IF_ERROR(r.Bool("cache_latents", cache_latents));
  if (cache_latents && (job.random_flip || !job.center_crop))
    return r.Error("cache_latents",
                   "needs a deterministic transform: set data.random_flip: false and "
                   "data.center_crop: true, or turn cache_latents off");
  return absl::OkStatus();
}

// A range of guidance scales [low, high], low < high, in [1, 100]; an absent key
// keeps `range` (which may be empty: then only a given range is checked).
inline absl::Status ReadGuidanceRange(SectionReader& r, std::vector<double>& range) {
  const bool given = r.Has("guidance_range");
  RETURN_IF_ERROR(r.NumberList("guidance_range", range, 1, 100));
  if (!given && range.empty()) return absl::OkStatus();
  if (range.size() == 2 && range[0] < range[1]) return absl::OkStatus();
  return r.Error("guidance_range",
                 absl::StrCat("must be [low, high] with low < high (e.g. [2, 14]), got ",
                              range.size() == 2 ? absl::StrCat("[", range[0], ", ", range[1], "]")
                                                : absl::StrCat(range.size(), " values")));
}

// How a distillation stage trains its student (the keys every distillation
// reads, with the seed's STEPS, LR and EMA_DECAY as defaults).
struct StudentSchedule {
  int64_t steps = 800;                    // STEPS (per phase for progressive distillation)
  double lr = 1e-5;                       // LR
  std::string lr_scheduler = "constant";  // after the warm-up
  int64_t lr_warmup_steps = 0;
  double max_grad_norm = 1.0;
  bool ema = true;                     // the result is the EMA
  double ema_decay = 0.9999;           // EMA_DECAY
  bool ema_warmup = true;              // diffusers' warm-up: min(ema_decay, 1 - (1 + t)^(-2/3))
  std::string mixed_precision = "no";  // or bf16 (CUDA autocast)
};

inline absl::Status ReadStudentSchedule(SectionReader& r, StudentSchedule& o) {
  RETURN_IF_ERROR(ReadStepsAndLr(r, o.steps, o.lr, o.lr_scheduler));
  RETURN_IF_ERROR(r.Int("lr_warmup_steps", o.lr_warmup_steps, 0, 1e9));
  RETURN_IF_ERROR(r.Number("max_grad_norm", o.max_grad_norm, 0, 1e9, true));
  RETURN_IF_ERROR(r.Bool("ema", o.ema));
  RETURN_IF_ERROR(r.Number("ema_decay", o.ema_decay, 0, 1, false, true));
  RETURN_IF_ERROR(r.Bool("ema_warmup", o.ema_warmup));
  return r.OneOf("mixed_precision", o.mixed_precision, {"no", "bf16"});
}

// A UNet student's schedule and its data: latents and timesteps.
struct StudentTraining : StudentSchedule {
  bool cache_latents = false;
  // Where the student trains: uniform, every integer t (the continuous interval
  // as the paper trains it: any spacing finds it trained, and the next phase asks
  // its teacher only for steps it learned); grid, only the DDIM timesteps it will
  // be sampled at (the paper's discrete algorithm). Uniform measured better on
  // the toy world (docs/toy-world.md "Distillation").
  std::string timestep_sampling = "uniform";
};

inline absl::Status ReadStudentTraining(SectionReader& r, const JobSpec& job, StudentTraining& o) {
  RETURN_IF_ERROR(ReadStudentSchedule(r, o));
  RETURN_IF_ERROR(ReadCacheLatents(r, job, o.cache_latents));
  return r.OneOf("timestep_sampling", o.timestep_sampling, {"grid", "uniform"});
}

}  // namespace sd::stages
