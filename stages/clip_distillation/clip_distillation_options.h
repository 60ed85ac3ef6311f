#pragma once
// Options of the clip_distillation stage (job.yaml section `clip_distillation:`).
#include <cstdint>
#include <string>
#include <vector>

#include "stages/training_options.h"

namespace sd::stages {

struct ClipDistillationOptions {
  ClipDistillationOptions() { train.steps = 400; }  // CLIP_DISTILL_STEPS
  StudentSchedule train;
  int64_t batch_size = 0;  // captions per rank and step; 0: the job's batch_size
  // The student's layer count; 0: half the teacher's, rounded up.
  int64_t layers = 0;
  // Student layer k starts from, and learns the output of, teacher layer
  // teacher_layers[k] (0-based, increasing). Empty: spread evenly with the last
  // on the teacher's last (12 -> 6: 1, 3, 5, 7, 9, 11), TinyBERT's mapping.
  std::vector<int64_t> teacher_layers;
  // Loss: final hidden states (after final_layer_norm: what the UNet reads), MSE;
  // each student layer's output against its teacher layer's, MSE relative to the
  // teacher's mean square (the residual stream grows with depth, and CLIP's has
  // outlier channels: relative, every layer counts alike); attention maps, KL.
  double hidden_weight = 1.0;
  double intermediate_weight = 1.0;
  double attention_weight = 0.0;
  // The token embedding stays the teacher's unless trained (finetune's key):
  // words the captions never show then still embed as the teacher embeds them.
  bool train_token_embedding = false;
  // Share of samples whose caption is the empty prompt: the unconditional input
  // classifier-free guidance reads must be distilled too.
  double empty_prompt_fraction = 0.1;
};

}  // namespace sd::stages
