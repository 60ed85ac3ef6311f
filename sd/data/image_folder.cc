#include "sd/data/image_folder.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "sd/image/png_image.h"

namespace sd {

absl::StatusOr<ImageFolderDataset> ImageFolderDataset::Open(const std::string& dir, int64_t resolution) {
  namespace fs = std::filesystem;
  const std::string meta = (fs::path(dir) / "metadata.jsonl").string();
  std::ifstream in(meta);
  if (!in) return absl::NotFoundError(absl::StrCat("dataset ", dir, " has no metadata.jsonl"));
  ImageFolderDataset d;
  d.dir_ = dir;
  d.resolution_ = resolution;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("file_name") || !j["file_name"].is_string() ||
        !j.contains("text") || !j["text"].is_string()) {
      d.problems_.push_back(absl::StrCat(meta, ":", line_no, ": expected {\"file_name\": str, \"text\": str}; line skipped"));
      continue;
    }
    d.entries_.push_back({(fs::path(dir) / j["file_name"].get<std::string>()).string(), j["text"].get<std::string>()});
  }
  if (d.entries_.empty()) return absl::InvalidArgumentError(absl::StrCat(meta, ": no usable entries"));
  return d;
}

absl::StatusOr<CaptionedImage> ImageFolderDataset::Get(size_t i) const {
  const Entry& e = entries_.at(i);
  auto img = ReadPng(e.path);
  if (!img.ok()) return img.status();
  auto x = img->permute({2, 0, 1}).to(torch::kFloat32).div(127.5).sub(1.0);
  const int64_t h = x.size(1), w = x.size(2), side = std::min(h, w);
  x = x.slice(1, (h - side) / 2, (h - side) / 2 + side).slice(2, (w - side) / 2, (w - side) / 2 + side);
  if (side != resolution_) {
    x = torch::nn::functional::interpolate(
            x.unsqueeze(0), torch::nn::functional::InterpolateFuncOptions()
                                .size(std::vector<int64_t>{resolution_, resolution_})
                                .mode(torch::kBilinear)
                                .align_corners(false)
                                .antialias(true))
            .squeeze(0);
  }
  return CaptionedImage{x.contiguous(), e.caption};
}

}  // namespace sd
