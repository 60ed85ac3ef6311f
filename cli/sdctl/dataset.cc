// sdctl dataset synth: the toy world's captioned shapes dataset.
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/sdctl/commands.h"
#include "common/args.h"
#include "sd/data/dataset.h"
#include "sd/data/synth_shapes.h"
#include "sd/util/status_macros.h"

namespace sdctl {
namespace {

absl::Status Synth(int argc, char** argv) {
  ASSIGN_OR_RETURN(Args args,
                   Args::Parse(argc, argv,
                               {"out", "count", "seed", "resolution", "split", "two-shape-fraction",
                                "radii", "image-format", "shard-size"}));
  if (!args.Has("out")) return absl::InvalidArgumentError("--out DIR is required");
  sd::synth::SynthOptions o;
  ASSIGN_OR_RETURN(o.count, args.Int("count", 1000));
  if (o.count < 1) return absl::InvalidArgumentError("--count must be at least 1");
  ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  ASSIGN_OR_RETURN(o.resolution, args.Int("resolution", 64));
  o.split = args.Get("split", "train");
  ASSIGN_OR_RETURN(o.two_shape_fraction, args.Double("two-shape-fraction", 0.25));
  if (o.two_shape_fraction < 0 || o.two_shape_fraction > 1)
    return absl::InvalidArgumentError("--two-shape-fraction must be in [0, 1]");
  if (args.Has("radii")) {
    const std::vector<std::string> parts = absl::StrSplit(args.Get("radii"), ',');
    if (parts.size() != 3)
      return absl::InvalidArgumentError(absl::StrCat(
          "--radii takes three fractions (small,medium,large), got \"", args.Get("radii"), "\""));
    for (size_t i = 0; i < 3; ++i)
      if (!absl::SimpleAtod(parts[i], &o.radii[i]))
        return absl::InvalidArgumentError(
            absl::StrCat("--radii: \"", parts[i], "\" is not a number"));
  }
  ASSIGN_OR_RETURN(int64_t shard_size, args.Int("shard-size", 0));
  RETURN_IF_ERROR(
      sd::synth::WriteDataset(o, args.Get("out"), args.Get("image-format", "png"), shard_size));
  // Read it back through the training pipeline's reader: what we wrote must load.
  ASSIGN_OR_RETURN(auto source, sd::OpenDataset(args.Get("out")));
  std::cout << "wrote " << source->size() << " " << o.split << " images to " << args.Get("out")
            << (shard_size > 0 ? " as WebDataset shards" : "") << "\n";
  return absl::OkStatus();
}

}  // namespace

int DatasetCommand(int argc, char** argv) {
  if (argc < 1 || std::string(argv[0]) != "synth") {
    std::cerr
        << "usage: sdctl dataset synth --out DIR [--count 1000] [--seed 0] [--resolution 64]\n"
           "                          [--split train|heldout] [--two-shape-fraction 0.25]\n"
        << "                          [--radii " << absl::StrJoin(sd::synth::kDefaultRadii, ",")
        << " (of the side: small,medium,large)]\n"
           "                          [--image-format png|jpg] [--shard-size N (WebDataset "
           "tar shards)]\n";
    return 2;
  }
  const absl::Status s = Synth(argc - 1, argv + 1);
  if (!s.ok()) {
    std::cerr << "sdctl dataset synth: " << s.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace sdctl
