#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Structured pruning of the UNet, text encoder and VAE (sd/prune): the input
// model with each pruned component replaced by a standard diffusers component of
// smaller widths, plus pruning_map.json (the kept channels of every pruned
// tensor, and the unpruned model it came from) and prune_report.json.
class PruneStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
