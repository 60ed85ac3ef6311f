#pragma once
// The inference flags sdctl generate, sdctl eval and the server share, so each
// spells and checks them the same way.
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/args.h"
#include "sd/pipeline/stable_diffusion.h"

namespace sdcli {

// Flags taking a value, and switches, to append to a command's Args::Parse lists.
const std::vector<std::string>& InferenceValueFlags();
const std::vector<std::string>& InferenceSwitches();
// One line per flag, for a command's usage text.
const char* InferenceFlagsUsage();

absl::StatusOr<sd::InferenceOptions> ParseInferenceFlags(const sd::Args& args);

// --device cpu|cuda[:N], --dtype fp32|fp16|bf16, --unet float|int8 and --lora
// FILE[:SCALE] (repeatable): how a front end loads the model (each command lists
// the ones it takes).
const char* ModelLoadFlagsUsage();
absl::StatusOr<sd::StableDiffusion::LoadOptions> ParseModelLoadFlags(const sd::Args& args);

// a + b, for building the Parse lists.
std::vector<std::string> Concat(std::vector<std::string> a, const std::vector<std::string>& b);

}  // namespace sdcli
