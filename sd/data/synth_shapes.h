#pragma once
// The toy world: captioned images of simple colored shapes on colored
// backgrounds. Every attribute a caption names (shape, color, size, position,
// background) is recorded in metadata.jsonl, so generated images can be scored
// against their prompts. Some single-shape attribute combinations never appear in
// the "train" split; the "heldout" split draws only from them.
#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace sd::synth {

const std::vector<std::string>& ShapeNames();       // circle, square, triangle, star
const std::vector<std::string>& ColorNames();       // shape colors
const std::vector<std::string>& BackgroundNames();  // background colors
const std::vector<std::string>& SizeNames();        // small, medium, large
const std::vector<std::string>& PositionNames();    // 3x3 grid, row-major

struct Object {
  int shape = 0, color = 0, size = 0, position = 0;
};

struct Scene {
  std::vector<Object> objects;  // one or two, at different positions
  int background = 0;
  std::string caption;
  nlohmann::json ToJson() const;  // {"objects": [...], "background": ...}
};

// Large enough that a 4x VAE's 16x16 latent shows a shape as a pattern of 5-8
// pixels, which the toy teacher learns in its budget (docs/toy-world.md, run V).
inline constexpr std::array<double, 3> kDefaultRadii = {0.18, 0.22, 0.26};

struct SynthOptions {
  int64_t count = 1000;
  uint64_t seed = 0;
  int64_t resolution = 64;
  double two_shape_fraction = 0.25;
  // Object radius per size (small, medium, large) as a fraction of the image side.
  std::array<double, 3> radii = kDefaultRadii;
  std::string split = "train";  // "train" or "heldout"
};

// Scene `index` of a split; the same (seed, index) always gives the same scene.
Scene MakeScene(const SynthOptions& o, int64_t index);
// [H, W, 3] uint8, anti-aliased by 4x4 supersampling. The 3x3 grid's outer
// centers sit at 1/6 of the side from the border, or further in when the large
// radius would cross it, so every object stays whole.
torch::Tensor Render(const Scene& s, int64_t resolution, uint64_t seed, int64_t index,
                     const std::array<double, 3>& radii = kDefaultRadii);
// True for the single-shape combinations reserved for the held-out split.
bool IsHeldOut(const Object& o, int background);

// Writes an image folder (NNNNNN.png + metadata.jsonl) or, with shard_size > 0,
// WebDataset tar shards (NNNNNN.png/.txt/.json per sample). Atomic per file.
absl::Status WriteDataset(const SynthOptions& o, const std::string& out_dir,
                          const std::string& format, int64_t shard_size);

}  // namespace sd::synth
