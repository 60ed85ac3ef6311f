#pragma once
// The toy world's prompt-accuracy judge: a small CNN that reads an image of the
// synthetic shapes world and predicts the shape, its color, its position and
// the background. Trained on the synthetic data (single-shape images), it
// scores generated images against the attributes their prompts asked for.
#include <torch/torch.h>

#include <array>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace sd::eval {

// The attributes a probe predicts, in this order.
inline constexpr std::array<const char*, 4> kProbeAttributes = {"shape", "color", "position",
                                                                "background"};

struct ShapeProbeImpl : torch::nn::Module {
  ShapeProbeImpl();
  // images [B, 3, 64, 64] in [-1, 1] (other sizes are resized) -> one logits
  // tensor per attribute.
  std::array<torch::Tensor, 4> forward(torch::Tensor images);

  torch::nn::Sequential features{nullptr};
  torch::nn::Linear hidden{nullptr};
  torch::nn::Linear shape{nullptr}, color{nullptr}, position{nullptr}, background{nullptr};
};
TORCH_MODULE(ShapeProbe);

// Labels [4] (shape, color, position, background) of a single-shape scene's
// metadata ({"objects": [{...}], "background": ...}); NotFound for anything else.
absl::StatusOr<std::array<int64_t, 4>> ProbeLabels(const nlohmann::json& meta);

// The single-shape scenes of a dataset, up to max_count: captions, labels [N, 4]
// and, when asked, the images [N, 3, 64, 64] in [-1, 1].
struct LabeledScenes {
  std::vector<std::string> captions;
  torch::Tensor labels, images;
};
absl::StatusOr<LabeledScenes> LoadLabeledScenes(const std::string& dataset, int64_t max_count,
                                                bool with_images);

struct ProbeTrainOptions {
  int64_t steps = 1500;
  int64_t batch_size = 64;
  double lr = 2e-3;
  int64_t seed = 0;
};

// Trains on the single-shape images of `dataset` (any CaptionedSource path).
absl::StatusOr<ShapeProbe> TrainProbe(const std::string& dataset, const ProbeTrainOptions& o,
                                      const std::function<void(int64_t, double)>& progress = {});

// Per-attribute accuracy of predictions against labels ([N, 4] each).
std::array<double, 4> Accuracy(const torch::Tensor& predicted, const torch::Tensor& labels);
// Argmax predictions [N, 4] for images [N, 3, H, W] in [-1, 1].
torch::Tensor Predict(ShapeProbe& probe, const torch::Tensor& images);

absl::Status SaveProbe(ShapeProbe& probe, const std::string& path);
absl::StatusOr<ShapeProbe> LoadProbe(const std::string& path);

}  // namespace sd::eval
