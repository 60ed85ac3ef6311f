#pragma once
// Captioned image datasets and the training data pipeline.
//
// Sources: the image-folder convention (images + metadata.jsonl lines
// {"file_name": ..., "text": ...}) and WebDataset tar shards (KEY.png|jpg +
// KEY.txt and/or KEY.json). A malformed metadata line, a sample with no image or
// caption, or an image that fails to decode is reported (file, line or member)
// and skipped; the rest of the dataset stays usable.
//
// The loader is deterministic per (seed, step, global sample index): which
// sample, the crop, the flip and the caption dropout depend on nothing else, so
// ranks shard the global batch without talking and a resumed run sees exactly
// the data an uninterrupted one would.
#include <torch/torch.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace sd {

struct RawSample {
  std::string image;   // encoded PNG or JPEG bytes
  std::string origin;  // file or "shard.tar:member" for errors
  std::string caption;
  nlohmann::json meta;  // the metadata line / KEY.json, when present
};

class CaptionedSource {
 public:
  virtual ~CaptionedSource() = default;
  virtual size_t size() const = 0;
  virtual absl::StatusOr<RawSample> Read(size_t i) const = 0;
  // What was skipped while indexing, one line each.
  const std::vector<std::string>& problems() const { return problems_; }

 protected:
  std::vector<std::string> problems_;
};

// A folder with metadata.jsonl, a .tar shard, a folder of .tar shards, or a
// brace pattern "shards/train-{000000..000009}.tar".
absl::StatusOr<std::unique_ptr<CaptionedSource>> OpenDataset(const std::string& path);

struct CaptionedImage {
  torch::Tensor pixels;  // [3, res, res] float in [-1, 1]
  std::string caption;
  nlohmann::json meta;
};

struct TransformOptions {
  int64_t resolution = 64;  // 0: captions only (text-encoder training): no image is decoded
  bool center_crop = true;  // false: random crop
  bool random_flip = false;
  double caption_dropout = 0.0;  // probability of an empty caption (for CFG training)
};

// Decode, resize the shorter side to `resolution`, crop, flip, drop the caption
// (only the last at resolution 0).
absl::StatusOr<CaptionedImage> Transform(const RawSample& raw, const TransformOptions& o,
                                         at::Generator& gen);

struct LoaderOptions {
  TransformOptions transform;
  int64_t local_batch = 1;
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t seed = 0;
  int prefetch = 2;  // batches prepared ahead on a background thread; 0: inline
};

struct Batch {
  int64_t step = 0;
  torch::Tensor pixels;  // [B, 3, res, res]; undefined for a captions-only loader
  std::vector<std::string> captions;
  std::vector<nlohmann::json> meta;
  std::vector<int64_t> indices;  // dataset index of each sample
  double wait_seconds = 0;       // how long Next() blocked for it (0 when prefetch keeps up)
};

class DataLoader {
 public:
  DataLoader(std::shared_ptr<const CaptionedSource> source, LoaderOptions o, int64_t start_step);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // The batch of the next step, in order.
  absl::StatusOr<Batch> Next();
  // Samples skipped because they failed to read or decode (each reported once).
  std::vector<std::string> problems() const;
  // Everything passed over so far: what indexing the dataset skipped (bad metadata
  // lines, damaged shards), then problems(); and how many entries the dataset
  // listed, usable or not, to weigh them against.
  std::vector<std::string> skipped() const;
  size_t dataset_entries() const { return source_->size() + source_->problems().size(); }

 private:
  absl::StatusOr<Batch> Make(int64_t step);
  int64_t Index(int64_t global_sample);
  void Produce();

  std::shared_ptr<const CaptionedSource> source_;
  LoaderOptions o_;
  int64_t next_step_;

  int64_t epoch_ = -1;
  torch::Tensor perm_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<absl::StatusOr<Batch>> ready_;
  std::set<int64_t> bad_;
  std::vector<std::string> problems_;
  bool stop_ = false;
  std::thread worker_;
};

// Per-(seed, step, index) random stream, shared by the loader and the stages
// (which use their own index ranges).
at::Generator SampleGenerator(int64_t seed, int64_t step, int64_t index);

}  // namespace sd
