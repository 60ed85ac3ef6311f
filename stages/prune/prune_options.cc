#include "stages/prune/prune_options.h"

#include "sd/util/status_macros.h"
#include "stages/catalog.h"

namespace sd::stages {

StageDescriptor PruneDescriptor() {
  StageDescriptor d;
  d.name = "prune";
  d.section = "prune";
  d.parse = [](SectionReader& r, const JobSpec&) -> absl::StatusOr<std::any> {
    PruneOptions o;
    // Below 1: a ratio of 1 would remove every channel.
    RETURN_IF_ERROR(r.NumberList("unet_ratio", o.unet_ratio, 0, 0.99));
    RETURN_IF_ERROR(r.Number("text_encoder_ratio", o.text_encoder_ratio, 0, 0.99));
    RETURN_IF_ERROR(r.NumberList("vae_ratio", o.vae_ratio, 0, 0.99));
    RETURN_IF_ERROR(r.String("criterion", o.criterion, "l1"));
    if (o.criterion != "l1") return r.Error("criterion", "must be l1");
    return o;
  };
  d.total_steps = [](const std::any&) -> int64_t { return 1; };
  return d;
}

}  // namespace sd::stages
