#include "stages/init/init_options.h"

#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sd::stages {

StageDescriptor InitDescriptor() {
  StageDescriptor d;
  d.name = "init";
  d.section = "init";
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    InitOptions o;
    RETURN_IF_ERROR(r.String("clip_bpe", o.clip_bpe, "a path or auto"));
    return o;
  };
  d.total_steps = [](const std::any&) -> int64_t { return 1; };
  return d;
}

}  // namespace sd::stages
