#include "absl/strings/str_cat.h"
#include "stages/finetune/finetune_stage.h"
#include "stages/stage.h"

namespace sd::stages {

absl::StatusOr<std::unique_ptr<Stage>> MakeStage(const std::string& name) {
  if (name == "finetune") return std::unique_ptr<Stage>(new FinetuneStage());
  return absl::UnimplementedError(absl::StrCat("stage \"", name, "\" is not implemented in this build"));
}

}  // namespace sd::stages
