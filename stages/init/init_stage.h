#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Builds a model with random weights from a folder of diffusers config files
// (model_index.json, {unet,vae,text_encoder}/config.json,
// scheduler/scheduler_config.json, tokenizer/): the start of a teacher trained
// from scratch. A tokenizer/ without vocabulary files gets CLIP's, built from
// the merges file named by init.clip_bpe ("auto" finds open_clip's copy).
class InitStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

// "auto": $SD_CLIP_BPE, else open_clip's bpe_simple_vocab_16e6.txt.gz in ./.venv
// or the system Python; otherwise the path itself.
absl::StatusOr<std::string> FindClipBpe(const std::string& setting);

}  // namespace sd::stages
