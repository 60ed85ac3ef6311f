#include "absl/strings/str_cat.h"
#include "stages/stage.h"

namespace sd::stages {

#define SD_STAGE(name, Type) std::unique_ptr<Stage> Make##Type##Stage();
#include "stages/catalog.inc"
#undef SD_STAGE

absl::StatusOr<std::unique_ptr<Stage>> MakeStage(const std::string& name) {
#define SD_STAGE(id, Type) \
  if (name == #id) return Make##Type##Stage();
#include "stages/catalog.inc"
#undef SD_STAGE
  return absl::UnimplementedError(
      absl::StrCat("stage \"", name, "\" is not implemented in this build"));
}

StageContext MakeStageContext(const TaskAssignment& task, JobSpec job) {
  StageContext ctx;
  ctx.job = std::move(job);
  ctx.rank = task.rank;
  ctx.world_size = task.world_size;
  ctx.checkpoint_dir = task.checkpoint_dir;
  ctx.output_dir = task.output_dir;
  ctx.input_model = task.input_model.empty() ? ctx.job.model : task.input_model;
  ctx.teacher_model = task.teacher_model.empty() ? ctx.job.model : task.teacher_model;
  ctx.artifacts_dir = task.artifacts_dir;
  if (torch::cuda::is_available()) {
    // One GPU per rank on multi-GPU hosts (NCCL wants its rank's device current).
    ctx.device =
        torch::Device(torch::kCUDA, static_cast<int>(task.rank % torch::cuda::device_count()));
  }
  return ctx;
}

}  // namespace sd::stages
