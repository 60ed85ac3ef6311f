#include "stages/train_vae/train_vae_options.h"

#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/training_options.h"

namespace sd::stages {

StageDescriptor TrainVaeDescriptor() {
  StageDescriptor d;
  d.name = "train_vae";
  d.section = "train_vae";
  d.needs_dataset = true;
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    TrainVaeOptions o;
    RETURN_IF_ERROR(ReadStepsAndLr(r, o.steps, o.lr, o.lr_scheduler));
    RETURN_IF_ERROR(r.Int("batch_size", o.batch_size, 0, 4096));
    RETURN_IF_ERROR(r.Number("kl_weight", o.kl_weight, 0, 1));
    RETURN_IF_ERROR(r.Number("foreground_weight", o.foreground_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Number("max_grad_norm", o.max_grad_norm, 0, 1e9, true));
    return o;
  };
  d.total_steps = [](const std::any& o) { return std::any_cast<const TrainVaeOptions&>(o).steps; };
  return d;
}

}  // namespace sd::stages
