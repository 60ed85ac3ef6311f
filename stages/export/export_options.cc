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
    RETURN_IF_ERROR(r.Bool("onnx", o.onnx));
    if (!o.sharded && !o.onnx)
      return r.Error("onnx", "and export.sharded are both false: nothing to export");
    return o;
  };
  d.total_steps = [](const std::any&) -> int64_t { return 1; };
  return d;
}

}  // namespace sd::stages
