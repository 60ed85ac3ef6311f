#include "stages/finetune/finetune_options.h"

#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/training_options.h"

namespace sd::stages {

StageDescriptor FinetuneDescriptor() {
  StageDescriptor d;
  d.name = "finetune";
  d.section = "finetune";
  d.needs_dataset = true;
  d.parse = [](SectionReader& r, const JobSpec& job) -> absl::StatusOr<std::any> {
    FinetuneOptions o;
    RETURN_IF_ERROR(ReadStepsAndLr(r, o.steps, o.lr, o.lr_scheduler));
    RETURN_IF_ERROR(r.Bool("ema", o.ema));
    RETURN_IF_ERROR(r.Number("ema_decay", o.ema_decay, 0, 1, false, true));
    RETURN_IF_ERROR(r.Int("lr_warmup_steps", o.lr_warmup_steps, -1, 1e9));
    RETURN_IF_ERROR(r.Number("max_grad_norm", o.max_grad_norm, 0, 1e9, true));
    RETURN_IF_ERROR(r.String("mixed_precision", o.mixed_precision, "no or bf16"));
    if (o.mixed_precision != "no" && o.mixed_precision != "bf16")
      return r.Error("mixed_precision",
                     "must be no or bf16 (fp16 would need loss scaling, not implemented)");
    RETURN_IF_ERROR(r.Bool("train_text_encoder", o.train_text_encoder));
    RETURN_IF_ERROR(r.Bool("train_token_embedding", o.train_token_embedding));
    RETURN_IF_ERROR(ReadCacheLatents(r, job, o.cache_latents));
    RETURN_IF_ERROR(r.Number("foreground_weight", o.foreground_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Number("snr_gamma", o.snr_gamma, 0, 1e6));
    RETURN_IF_ERROR(r.OneOf("timestep_sampling", o.timestep_sampling, {"uniform", "logit_normal"}));
    RETURN_IF_ERROR(r.Number("logit_mean", o.logit_mean, -10, 10));
    RETURN_IF_ERROR(r.Number("logit_std", o.logit_std, 0, 10));
    RETURN_IF_ERROR(r.String("teacher", o.teacher, "auto, none or a model folder"));
    RETURN_IF_ERROR(r.Number("task_weight", o.task_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Number("kd_output_weight", o.kd_output_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Number("kd_feature_weight", o.kd_feature_weight, 0, 1e6));
    if (o.task_weight + o.kd_output_weight + o.kd_feature_weight <= 0)
      return r.Error("task_weight",
                     "task_weight, kd_output_weight and kd_feature_weight are all 0: the UNet "
                     "would learn nothing");
    if (o.teacher == "none" && o.task_weight <= 0)
      return r.Error("task_weight", "is 0 with teacher: none: the UNet would learn nothing");
    RETURN_IF_ERROR(r.Bool("recover_text_encoder", o.recover_text_encoder));
    RETURN_IF_ERROR(r.Bool("recover_vae", o.recover_vae));
    return o;
  };
  d.total_steps = [](const std::any& o) { return std::any_cast<const FinetuneOptions&>(o).steps; };
  return d;
}

}  // namespace sd::stages
