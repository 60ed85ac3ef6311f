#include "stages/progressive_distillation/progressive_distillation_options.h"

#include "absl/strings/str_cat.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/training_options.h"

namespace sd::stages {

StageDescriptor ProgressiveDistillationDescriptor() {
  StageDescriptor d;
  d.name = "progressive_distillation";
  d.section = "progressive_distillation";
  d.needs_dataset = true;
  d.parse = [](SectionReader& r, const JobSpec& job) -> absl::StatusOr<std::any> {
    ProgressiveDistillationOptions o;
    RETURN_IF_ERROR(r.IntList("progressive_stages", o.progressive_stages, 1, 1000));
    const auto& st = o.progressive_stages;
    if (st.size() < 2)
      return r.Error("progressive_stages",
                     "needs the teacher's step count and at least one student's (e.g. 50,25,12,6)");
    for (size_t i = 1; i < st.size(); ++i) {
      if (st[i] >= st[i - 1])
        return r.Error("progressive_stages",
                       absl::StrCat("must decrease: ", st[i], " follows ", st[i - 1]));
      // The teacher takes two steps per student step: a bigger drop would ask it
      // for steps far longer than any it learned.
      if (2 * st[i - 1] > 5 * st[i])
        return r.Error("progressive_stages",
                       absl::StrCat("drops from ", st[i - 1], " to ", st[i],
                                    " steps; a phase may cut the steps by 2.5x at most "
                                    "(the teacher takes two steps per student step)"));
    }
    RETURN_IF_ERROR(ReadStudentTraining(r, job, o.train));
    RETURN_IF_ERROR(r.OneOf("timestep_spacing", o.timestep_spacing, {"trailing", "leading"}));
    RETURN_IF_ERROR(r.Number("attention_weight", o.attention_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Bool("keep_phase_models", o.keep_phase_models));
    RETURN_IF_ERROR(ReadGuidanceRange(r, o.guidance_range));
    RETURN_IF_ERROR(r.Number("guided_scale", o.guided_scale, 0, 100));
    if (o.guided_scale > 0 && !o.guidance_range.empty())
      return r.Error("guided_scale",
                     "is for a two-pass student; guidance_range is for a CFG-distilled input, "
                     "which has guidance built in: set one of them");
    return o;
  };
  d.total_steps = [](const std::any& a) {
    const auto& o = std::any_cast<const ProgressiveDistillationOptions&>(a);
    return o.train.steps * static_cast<int64_t>(o.progressive_stages.size() - 1);
  };
  return d;
}

}  // namespace sd::stages
