#include "stages/quantize/quantize_options.h"

#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sd::stages {

StageDescriptor QuantizeDescriptor() {
  StageDescriptor d;
  d.name = "quantize";
  d.section = "quantize";
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    QuantizeOptions o;
    RETURN_IF_ERROR(r.OneOf("dtype", o.dtype, {"fp16", "bf16"}));
    return o;
  };
  d.total_steps = [](const std::any&) -> int64_t { return 1; };
  return d;
}

}  // namespace sd::stages
