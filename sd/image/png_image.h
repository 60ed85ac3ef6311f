#pragma once
#include <torch/torch.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sd {

// image: [H, W, 3] float in [0, 1] or uint8; rounded like diffusers' numpy_to_pil.
absl::StatusOr<std::string> EncodePng(const torch::Tensor& image);
absl::Status WritePng(const std::string& path, const torch::Tensor& image);
// Returns [H, W, 3] uint8 (gray and alpha are converted to RGB).
absl::StatusOr<torch::Tensor> ReadPng(const std::string& path);
// The same from bytes in memory; `origin` names the source in errors.
absl::StatusOr<torch::Tensor> DecodePng(std::string_view bytes, const std::string& origin);

}  // namespace sd
