#include "absl/strings/str_cat.h"
#include "stages/finetune/finetune_stage.h"
#include "stages/init/init_stage.h"
#include "stages/train_vae/train_vae_stage.h"
#include "stages/stage.h"

namespace sd::stages {

absl::StatusOr<std::unique_ptr<Stage>> MakeStage(const std::string& name) {
  if (name == "init") return std::unique_ptr<Stage>(new InitStage());
  if (name == "train_vae") return std::unique_ptr<Stage>(new TrainVaeStage());
  if (name == "finetune") return std::unique_ptr<Stage>(new FinetuneStage());
  return absl::UnimplementedError(absl::StrCat("stage \"", name, "\" is not implemented in this build"));
}

}  // namespace sd::stages
