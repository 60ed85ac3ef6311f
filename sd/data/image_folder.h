#pragma once
// The image-folder convention: images plus metadata.jsonl lines
// {"file_name": "...", "text": "..."}. A malformed line or unreadable image is
// reported with its line/file and skipped; the rest of the dataset stays usable.
#include <torch/torch.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sd {

struct CaptionedImage {
  torch::Tensor pixels;  // [3, res, res] float in [-1, 1]
  std::string caption;
};

class ImageFolderDataset {
 public:
  static absl::StatusOr<ImageFolderDataset> Open(const std::string& dir, int64_t resolution);
  size_t size() const { return entries_.size(); }
  // Loads, center-crops and resizes entry i.
  absl::StatusOr<CaptionedImage> Get(size_t i) const;
  const std::vector<std::string>& problems() const { return problems_; }

 private:
  struct Entry {
    std::string path, caption;
  };
  std::string dir_;
  int64_t resolution_ = 64;
  std::vector<Entry> entries_;
  std::vector<std::string> problems_;
};

}  // namespace sd
