#pragma once
#include <torch/torch.h>

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace sd {

// image: [H, W, 3] uint8. quality 1-100.
absl::StatusOr<std::string> EncodeJpeg(const torch::Tensor& image, int quality = 95);
// Returns [H, W, 3] uint8; grayscale and CMYK are converted to RGB. `origin`
// names the source in errors.
absl::StatusOr<torch::Tensor> DecodeJpeg(std::string_view bytes, const std::string& origin);

// PNG or JPEG, told apart by their signatures.
absl::StatusOr<torch::Tensor> DecodeImage(std::string_view bytes, const std::string& origin);

}  // namespace sd
