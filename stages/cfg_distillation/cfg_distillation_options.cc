#include "stages/cfg_distillation/cfg_distillation_options.h"

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
    RETURN_IF_ERROR(ReadStudentTraining(r, job, o.train));
    RETURN_IF_ERROR(ReadGuidanceRange(r, o.guidance_range));
    RETURN_IF_ERROR(r.Int("guidance_embedding_dim", o.guidance_embedding_dim, 2, 4096));
    return o;
  };
  d.total_steps = [](const std::any& o) {
    return std::any_cast<const CfgDistillationOptions&>(o).train.steps;
  };
  return d;
}

}  // namespace sd::stages
