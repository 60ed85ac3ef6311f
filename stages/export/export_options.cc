#include "stages/export/export_options.h"

#include "absl/status/status.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sd::stages {

StageDescriptor ExportDescriptor() {
  StageDescriptor d;
  d.name = "export";
  d.section = "export";
  d.produces = Produces::kArtifact;
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    ExportOptions o;
    RETURN_IF_ERROR(r.Bool("sharded", o.sharded));
    RETURN_IF_ERROR(r.Int("max_shard_mb", o.max_shard_mb, 1, 1 << 20));
    if (!o.sharded)
      return r.Error("sharded",
                     "is false, and it is the only export format built yet: nothing to export");
    return o;
  };
  d.total_steps = [](const std::any&) -> int64_t { return 1; };
  return d;
}

}  // namespace sd::stages
