#include "stages/clip_distillation/clip_distillation_options.h"

#include "absl/strings/str_cat.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/training_options.h"

namespace sd::stages {

StageDescriptor ClipDistillationDescriptor() {
  StageDescriptor d;
  d.name = "clip_distillation";
  d.section = "clip_distillation";
  d.needs_dataset = true;
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    ClipDistillationOptions o;
    RETURN_IF_ERROR(ReadStudentSchedule(r, o.train));
    RETURN_IF_ERROR(r.Int("batch_size", o.batch_size, 0, 1 << 20));
    RETURN_IF_ERROR(r.Int("layers", o.layers, 0, 1000));
    RETURN_IF_ERROR(r.IntList("teacher_layers", o.teacher_layers, 0, 999));
    const auto& tl = o.teacher_layers;
    for (size_t i = 1; i < tl.size(); ++i) {
      if (tl[i] <= tl[i - 1])
        return r.Error("teacher_layers",
                       absl::StrCat("must increase: ", tl[i], " follows ", tl[i - 1]));
    }
    if (!tl.empty() && o.layers != 0 && static_cast<int64_t>(tl.size()) != o.layers)
      return r.Error("teacher_layers", absl::StrCat("names ", tl.size(), " teacher layers for ",
                                                    o.layers, " student layers (layers)"));
    RETURN_IF_ERROR(r.Number("hidden_weight", o.hidden_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Number("intermediate_weight", o.intermediate_weight, 0, 1e6));
    RETURN_IF_ERROR(r.Number("attention_weight", o.attention_weight, 0, 1e6));
    if (o.hidden_weight + o.intermediate_weight + o.attention_weight <= 0)
      return r.Error("hidden_weight",
                     "hidden_weight, intermediate_weight and attention_weight are all 0: "
                     "the student would learn nothing");
    RETURN_IF_ERROR(r.Bool("train_token_embedding", o.train_token_embedding));
    RETURN_IF_ERROR(r.Number("empty_prompt_fraction", o.empty_prompt_fraction, 0, 1));
    return o;
  };
  d.total_steps = [](const std::any& o) {
    return std::any_cast<const ClipDistillationOptions&>(o).train.steps;
  };
  return d;
}

}  // namespace sd::stages
