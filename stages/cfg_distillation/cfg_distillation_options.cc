#include "stages/cfg_distillation/cfg_distillation_options.h"

#include "absl/strings/str_cat.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/training_options.h"

namespace sd::stages {

StageDescriptor CfgDistillationDescriptor() {
  StageDescriptor d;
  d.name = "cfg_distillation";
  d.section = "cfg_distillation";
  d.needs_dataset = true;
  d.parse = [](SectionReader& r, const JobSpec& job) -> absl::StatusOr<std::any> {
    CfgDistillationOptions o;
    RETURN_IF_ERROR(ReadStepsAndLr(r, o.steps, o.lr, o.lr_scheduler));
    RETURN_IF_ERROR(r.Int("lr_warmup_steps", o.lr_warmup_steps, 0, 1e9));
    RETURN_IF_ERROR(r.Number("max_grad_norm", o.max_grad_norm, 0, 1e9, true));
    RETURN_IF_ERROR(r.Bool("ema", o.ema));
    RETURN_IF_ERROR(r.Number("ema_decay", o.ema_decay, 0, 1, false, true));
    RETURN_IF_ERROR(r.Bool("ema_warmup", o.ema_warmup));
    RETURN_IF_ERROR(r.NumberList("guidance_range", o.guidance_range, 1, 100));
    if (o.guidance_range.size() != 2 || !(o.guidance_range[0] < o.guidance_range[1]))
      return r.Error(
          "guidance_range",
          absl::StrCat("must be [low, high] with low < high (e.g. [2, 14]), got ",
                       o.guidance_range.size() == 2
                           ? absl::StrCat("[", o.guidance_range[0], ", ", o.guidance_range[1], "]")
                           : absl::StrCat(o.guidance_range.size(), " values")));
    RETURN_IF_ERROR(r.Int("guidance_embedding_dim", o.guidance_embedding_dim, 2, 4096));
    RETURN_IF_ERROR(r.Bool("cache_latents", o.cache_latents));
    if (o.cache_latents && (job.random_flip || !job.center_crop))
      return r.Error("cache_latents",
                     "needs a deterministic transform: set data.random_flip: false and "
                     "data.center_crop: true, or turn cache_latents off");
    RETURN_IF_ERROR(r.OneOf("mixed_precision", o.mixed_precision, {"no", "bf16"}));
    return o;
  };
  d.total_steps = [](const std::any& o) {
    return std::any_cast<const CfgDistillationOptions&>(o).steps;
  };
  return d;
}

}  // namespace sd::stages
