#pragma once
#include "stages/stage.h"

namespace sd::stages {

// Deployment artifacts of the input model beside the chain (the seed's
// output/export/): the UNet as shards for streaming load (sharded/). See
// docs/architecture.md "Export".
class ExportStage : public Stage {
 public:
  absl::Status Run(StageContext& ctx) override;
};

}  // namespace sd::stages
