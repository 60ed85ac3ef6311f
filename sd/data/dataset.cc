#include "sd/data/dataset.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/data/tar.h"
#include "sd/image/jpeg_image.h"
#include "sd/util/file.h"
#include "sd/util/mmap_file.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace fs = std::filesystem;
namespace {

// The caption under "text" or "caption"; nullopt when neither is a string.
std::optional<std::string> CaptionOf(const nlohmann::json& j) {
  for (const char* k : {"text", "caption"}) {
    if (j.contains(k) && j[k].is_string()) return j[k].get<std::string>();
  }
  return std::nullopt;
}

class ImageFolderSource : public CaptionedSource {
 public:
  static absl::StatusOr<std::unique_ptr<CaptionedSource>> Open(const std::string& dir) {
    const std::string meta = (fs::path(dir) / "metadata.jsonl").string();
    std::ifstream in(meta);
    if (!in) return absl::NotFoundError(absl::StrCat("dataset ", dir, " has no metadata.jsonl"));
    auto d = std::make_unique<ImageFolderSource>();
    int line_no = 0;
    for (std::string line; std::getline(in, line);) {
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("file_name") ||
          !j["file_name"].is_string() || !CaptionOf(j)) {
        d->problems_.push_back(absl::StrCat(
            meta, ":", line_no, ": expected {\"file_name\": str, \"text\": str}; line skipped"));
        continue;
      }
      d->entries_.push_back({(fs::path(dir) / j["file_name"].get<std::string>()).string(), j});
    }
    if (d->entries_.empty())
      return absl::InvalidArgumentError(absl::StrCat(meta, ": no usable entries"));
    return std::unique_ptr<CaptionedSource>(std::move(d));
  }
  size_t size() const override { return entries_.size(); }
  absl::StatusOr<RawSample> Read(size_t i) const override {
    const auto& [path, meta] = entries_.at(i);
    ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
    return RawSample{std::move(bytes), path, CaptionOf(meta).value_or(""), meta};
  }

 private:
  std::vector<std::pair<std::string, nlohmann::json>> entries_;
};

class WebDatasetSource : public CaptionedSource {
 public:
  static absl::StatusOr<std::unique_ptr<CaptionedSource>> Open(
      const std::vector<std::string>& shards) {
    auto d = std::make_unique<WebDatasetSource>();
    for (const auto& path : shards) {
      ASSIGN_OR_RETURN(auto file, MappedFile::Open(path));
      const std::string_view bytes(reinterpret_cast<const char*>(file->data()), file->size());
      auto members = tar::Index(bytes, path);
      if (!members.ok()) {
        // A damaged shard loses only its own samples.
        d->problems_.push_back(absl::StrCat(members.status().message(), "; shard skipped"));
        continue;
      }
      const size_t shard = d->files_.size();
      d->files_.push_back(file);
      // Group members by key (the name up to the first dot of its last component).
      std::map<std::string, Sample> by_key;
      std::vector<std::string> order;
      for (const auto& m : *members) {
        const size_t slash = m.name.rfind('/');
        const size_t dot = m.name.find('.', slash == std::string::npos ? 0 : slash + 1);
        if (dot == std::string::npos) continue;
        const std::string key = m.name.substr(0, dot), ext = m.name.substr(dot + 1);
        auto [it, fresh] = by_key.try_emplace(key);
        if (fresh) order.push_back(key);
        Sample& s = it->second;
        s.shard = shard;
        s.key = key;
        if (ext == "png" || ext == "jpg" || ext == "jpeg") s.image = m;
        if (ext == "txt") s.txt = m;
        if (ext == "json") s.json = m;
      }
      for (const auto& key : order) {
        Sample& s = by_key[key];
        if (s.image.size == 0 || (s.txt.size == 0 && s.json.size == 0)) {
          d->problems_.push_back(absl::StrCat(path, ":", key,
                                              ": needs an image (.png/.jpg) and a caption "
                                              "(.txt or .json); sample skipped"));
          continue;
        }
        d->samples_.push_back(s);
      }
    }
    if (d->samples_.empty())
      return absl::InvalidArgumentError(absl::StrCat("no usable samples in ", shards.size(),
                                                     " WebDataset shard(s), first ", shards[0]));
    return std::unique_ptr<CaptionedSource>(std::move(d));
  }
  size_t size() const override { return samples_.size(); }
  absl::StatusOr<RawSample> Read(size_t i) const override {
    const Sample& s = samples_.at(i);
    const auto& f = files_[s.shard];
    auto view = [&](const tar::Member& m) {
      return std::string(reinterpret_cast<const char*>(f->data()) + m.offset, m.size);
    };
    RawSample r;
    r.image = view(s.image);
    r.origin = absl::StrCat(f->path(), ":", s.image.name);
    if (s.json.size > 0) {
      r.meta = nlohmann::json::parse(view(s.json), nullptr, false);
      if (r.meta.is_discarded() || !r.meta.is_object())
        return absl::InvalidArgumentError(
            absl::StrCat(f->path(), ":", s.json.name, ": not a JSON object"));
      r.caption = CaptionOf(r.meta).value_or("");
    }
    if (s.txt.size > 0) r.caption = view(s.txt);
    return r;
  }

 private:
  struct Sample {
    size_t shard = 0;
    std::string key;
    tar::Member image, txt, json;
  };
  std::vector<std::shared_ptr<MappedFile>> files_;
  std::vector<Sample> samples_;
};

// "dir/train-{000000..000003}.tar" -> the four names.
absl::StatusOr<std::vector<std::string>> ExpandBraces(const std::string& pattern) {
  static const std::regex re(R"(^(.*)\{(\d+)\.\.(\d+)\}(.*)$)");
  std::smatch m;
  if (!std::regex_match(pattern, m, re)) return std::vector<std::string>{pattern};
  const std::string lo = m[2], hi = m[3];
  const int64_t a = std::stoll(lo), b = std::stoll(hi);
  if (b < a)
    return absl::InvalidArgumentError(absl::StrCat("dataset pattern ", pattern, ": empty range"));
  std::vector<std::string> out;
  for (int64_t i = a; i <= b; ++i) {
    std::string num = std::to_string(i);
    if (num.size() < lo.size()) num.insert(0, lo.size() - num.size(), '0');
    out.push_back(absl::StrCat(m[1].str(), num, m[4].str()));
  }
  return out;
}

}  // namespace

at::Generator SampleGenerator(int64_t seed, int64_t step, int64_t index) {
  // splitmix-style mixing: independent streams per (seed, step, sample).
  uint64_t x = static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull ^
               static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull ^
               static_cast<uint64_t>(index) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return at::make_generator<at::CPUGeneratorImpl>(x);
}

absl::StatusOr<std::unique_ptr<CaptionedSource>> OpenDataset(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("no dataset given");
  if (fs::is_directory(path)) {
    if (fs::exists(fs::path(path) / "metadata.jsonl")) return ImageFolderSource::Open(path);
    std::vector<std::string> shards;
    for (const auto& e : fs::directory_iterator(path)) {
      if (e.path().extension() == ".tar") shards.push_back(e.path().string());
    }
    if (shards.empty())
      return absl::NotFoundError(
          absl::StrCat("dataset ", path, " has neither metadata.jsonl nor .tar shards"));
    std::sort(shards.begin(), shards.end());
    return WebDatasetSource::Open(shards);
  }
  if (path.find('{') == std::string::npos && !fs::exists(path))
    return absl::NotFoundError(absl::StrCat(
        "dataset ", path,
        " does not exist (expected an image folder with metadata.jsonl, a .tar shard, a folder "
        "of shards or a pattern like shards/train-{000000..000009}.tar)"));
  ASSIGN_OR_RETURN(auto shards, ExpandBraces(path));
  for (const auto& s : shards) {
    if (!fs::exists(s))
      return absl::NotFoundError(absl::StrCat("dataset shard ", s, " does not exist"));
  }
  return WebDatasetSource::Open(shards);
}

namespace {

std::string DropCaption(const std::string& caption, const TransformOptions& o, at::Generator& gen) {
  if (o.caption_dropout > 0 && torch::rand({1}, gen).item<double>() < o.caption_dropout) return "";
  return caption;
}

}  // namespace

absl::StatusOr<CaptionedImage> Transform(const RawSample& raw, const TransformOptions& o,
                                         at::Generator& gen) {
  if (o.resolution == 0)
    return CaptionedImage{torch::Tensor(), DropCaption(raw.caption, o, gen), raw.meta};
  ASSIGN_OR_RETURN(torch::Tensor img, DecodeImage(raw.image, raw.origin));
  auto x = img.permute({2, 0, 1}).to(torch::kFloat32).div(127.5).sub(1.0);
  const int64_t h = x.size(1), w = x.size(2), res = o.resolution;
  // Resize the shorter side to `res`, keeping the aspect ratio.
  const double scale = static_cast<double>(res) / static_cast<double>(std::min(h, w));
  const int64_t nh = std::max(res, static_cast<int64_t>(std::lround(h * scale)));
  const int64_t nw = std::max(res, static_cast<int64_t>(std::lround(w * scale)));
  if (nh != h || nw != w) {
    namespace F = torch::nn::functional;
    x = F::interpolate(x.unsqueeze(0), F::InterpolateFuncOptions()
                                           .size(std::vector<int64_t>{nh, nw})
                                           .mode(torch::kBilinear)
                                           .align_corners(false)
                                           .antialias(true))
            .squeeze(0);
  }
  int64_t top = (nh - res) / 2, left = (nw - res) / 2;
  if (!o.center_crop) {
    top = torch::randint(0, nh - res + 1, {1}, gen, torch::kLong).item<int64_t>();
    left = torch::randint(0, nw - res + 1, {1}, gen, torch::kLong).item<int64_t>();
  }
  x = x.slice(1, top, top + res).slice(2, left, left + res);
  if (o.random_flip && torch::rand({1}, gen).item<double>() < 0.5) x = x.flip({2});
  return CaptionedImage{x.contiguous(), DropCaption(raw.caption, o, gen), raw.meta};
}

DataLoader::DataLoader(std::shared_ptr<const CaptionedSource> source, LoaderOptions o,
                       int64_t start_step)
    : source_(std::move(source)), o_(o), next_step_(start_step) {
  if (o_.prefetch > 0) worker_ = std::thread([this] { Produce(); });
}

DataLoader::~DataLoader() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

int64_t DataLoader::Index(int64_t global_sample) {
  const int64_t n = static_cast<int64_t>(source_->size());
  const int64_t epoch = global_sample / n;
  if (epoch != epoch_) {
    // One shuffled order per epoch, the same on every rank.
    auto gen = SampleGenerator(o_.seed, -1 - epoch, 0);
    perm_ = torch::randperm(n, gen, torch::kLong);
    epoch_ = epoch;
  }
  return perm_[global_sample % n].item<int64_t>();
}

absl::StatusOr<Batch> DataLoader::Make(int64_t step) {
  Batch b;
  b.step = step;
  std::vector<torch::Tensor> pixels;
  const int64_t n = static_cast<int64_t>(source_->size());
  const int64_t global_batch = o_.local_batch * o_.world_size;
  for (int64_t j = 0; j < o_.local_batch; ++j) {
    const int64_t g = step * global_batch + o_.rank * o_.local_batch + j;
    int64_t idx = Index(g);
    // A sample that fails is replaced by the next one in dataset order, so all
    // ranks still agree on what the batch holds.
    for (int64_t tries = 0;; ++tries, idx = (idx + 1) % n) {
      if (tries == n) return absl::DataLossError("no sample of the dataset can be read");
      {
        std::lock_guard<std::mutex> l(mu_);
        if (bad_.count(idx)) continue;
      }
      auto gen = SampleGenerator(o_.seed ^ 0xDA7A, step, g);
      auto raw = source_->Read(static_cast<size_t>(idx));
      absl::StatusOr<CaptionedImage> item =
          raw.ok() ? Transform(*raw, o_.transform, gen) : raw.status();
      if (!item.ok()) {
        std::lock_guard<std::mutex> l(mu_);
        bad_.insert(idx);
        problems_.push_back(absl::StrCat(item.status().message(), "; sample skipped"));
        continue;
      }
      pixels.push_back(item->pixels);
      b.captions.push_back(std::move(item->caption));
      b.meta.push_back(std::move(item->meta));
      b.indices.push_back(idx);
      break;
    }
  }
  if (o_.transform.resolution > 0) b.pixels = torch::stack(pixels);
  return b;
}

void DataLoader::Produce() {
  int64_t step = next_step_;
  while (true) {
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || static_cast<int>(ready_.size()) < o_.prefetch; });
      if (stop_) return;
    }
    auto b = Make(step++);
    {
      std::lock_guard<std::mutex> l(mu_);
      ready_.push_back(std::move(b));
    }
    cv_.notify_all();
  }
}

absl::StatusOr<Batch> DataLoader::Next() {
  const auto t0 = std::chrono::steady_clock::now();
  auto waited = [&t0] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  if (o_.prefetch <= 0) {
    auto b = Make(next_step_++);
    if (b.ok()) b->wait_seconds = waited();
    return b;
  }
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !ready_.empty(); });
  auto b = std::move(ready_.front());
  if (b.ok()) b->wait_seconds = waited();
  ready_.pop_front();
  ++next_step_;
  l.unlock();
  cv_.notify_all();
  return b;
}

std::vector<std::string> DataLoader::problems() const {
  std::lock_guard<std::mutex> l(mu_);
  return problems_;
}

std::vector<std::string> DataLoader::skipped() const {
  std::vector<std::string> out = source_->problems();
  const auto mine = problems();
  out.insert(out.end(), mine.begin(), mine.end());
  return out;
}

}  // namespace sd
