#include "stages/quantize/quantize_options.h"

#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sd::stages {

StageDescriptor QuantizeDescriptor() {
  StageDescriptor d;
  d.name = "quantize";
  d.section = "quantize";
  d.needs_dataset_with = [](const std::any& o) {
    return std::any_cast<const QuantizeOptions&>(o).int8;
  };
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    QuantizeOptions o;
    RETURN_IF_ERROR(r.OneOf("dtype", o.dtype, {"fp16", "bf16"}));
    RETURN_IF_ERROR(r.Bool("int8", o.int8));
    // Fewer than 8 prompts give activation ranges that are noise (calibration.h).
    RETURN_IF_ERROR(r.Int("calibration_samples", o.calibration_samples, 8, 1e6));
    RETURN_IF_ERROR(r.Int("heldout_prompts", o.heldout_prompts, 1, 1e4));
    RETURN_IF_ERROR(r.Int("calibration_steps", o.calibration_steps, 0, 1000));
    RETURN_IF_ERROR(r.Number("guidance_scale", o.guidance_scale, 0, 100));
    RETURN_IF_ERROR(r.String("scheduler", o.scheduler));
    RETURN_IF_ERROR(r.OneOf("clipping", o.clipping, {"auto", "absmax", "percentile", "mse"}));
    RETURN_IF_ERROR(r.Bool("int8_convolutions", o.int8_convolutions));
    RETURN_IF_ERROR(r.Number("min_layer_sqnr_db", o.min_layer_sqnr_db, 0, 100));
    RETURN_IF_ERROR(r.Int("calibration_batch", o.calibration_batch, 1, 1024));
    return o;
  };
  d.total_steps = [](const std::any&) -> int64_t { return 1; };
  return d;
}

}  // namespace sd::stages
