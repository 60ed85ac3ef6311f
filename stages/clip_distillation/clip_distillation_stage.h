#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "stages/clip_distillation/clip_distillation_options.h"
#include "stages/stage.h"

namespace sd::stages {

// CLIP text-encoder distillation: a student with fewer layers of the same width
// and tokenizer (so the UNet's cross-attention reads it unchanged), started from
// the teacher's layers it is mapped to, learns the teacher's final hidden states
// (what the UNet reads) and, TinyBERT-style, each mapped layer's hidden states
// (and attention maps) on the dataset's captions and the empty prompt. Written
// as a transformers CLIPTextModel folder with num_hidden_layers changed.
class ClipDistillationStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

// The teacher layer each student layer learns from, for a teacher of
// `teacher_layers` layers under `o` (`origin` names the model in errors).
absl::StatusOr<std::vector<int64_t>> StudentLayerMap(const ClipDistillationOptions& o,
                                                     int64_t teacher_layers,
                                                     const std::string& origin);

}  // namespace sd::stages
