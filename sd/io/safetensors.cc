#include "sd/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::safetensors {
namespace {

constexpr size_t kMaxHeaderBytes = 100u << 20;  // the format's own limit

struct DtypeEntry {
  const char* name;
  torch::Dtype dtype;
};
constexpr DtypeEntry kDtypes[] = {
    {"F64", torch::kFloat64},   {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
    {"BF16", torch::kBFloat16}, {"I64", torch::kInt64},   {"I32", torch::kInt32},
    {"I16", torch::kInt16},     {"I8", torch::kInt8},     {"U8", torch::kUInt8},
    {"BOOL", torch::kBool},
};

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat("malformed safetensors file ", path, ": ", what));
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

}  // namespace

absl::StatusOr<torch::Dtype> ParseDtype(const std::string& s) {
  for (const auto& e : kDtypes) {
    if (s == e.name) return e.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", s, "\""));
}

absl::StatusOr<std::string> DtypeName(torch::Dtype dtype) {
  for (const auto& e : kDtypes) {
    if (dtype == e.dtype) return std::string(e.name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("dtype ", c10::toString(dtype), " cannot be stored in safetensors"));
}

absl::StatusOr<File> File::Open(const std::string& path) {
  File f;
  ASSIGN_OR_RETURN(f.map_, MappedFile::Open(path));
  const size_t size = f.map_->size();
  if (size < 8)
    return Bad(path,
               absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  uint64_t header_len = 0;
  std::memcpy(&header_len, f.map_->data(), 8);  // little-endian on every supported host
  if (header_len > kMaxHeaderBytes)
    return Bad(path, absl::StrCat("header length ", header_len, " exceeds the 100 MiB limit"));
  if (header_len > size - 8) {
    return Bad(path, absl::StrCat("header length ", header_len, " runs past the end of the ", size,
                                  "-byte file (truncated?)"));
  }
  f.data_start_ = 8 + header_len;
  const size_t data_size = size - f.data_start_;
  const char* hdr = reinterpret_cast<const char*>(f.map_->data() + 8);
  nlohmann::json j =
      nlohmann::json::parse(hdr, hdr + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(path, "header is not valid JSON");
  if (!j.is_object()) return Bad(path, "header JSON is not an object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return Bad(path, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          return Bad(path, absl::StrCat("__metadata__ value of \"", m.key(), "\" is not a string"));
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto where = [&](const std::string& what) {
      return Bad(path, absl::StrCat("tensor \"", name, "\": ", what));
    };
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets")) {
      return where("entry needs dtype, shape and data_offsets");
    }
    if (!v["dtype"].is_string()) return where("dtype is not a string");
    auto dtype = ParseDtype(v["dtype"].get<std::string>());
    if (!dtype.ok()) return where(std::string(dtype.status().message()));
    TensorInfo info;
    info.name = name;
    info.dtype = *dtype;
    if (!v["shape"].is_array()) return where("shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return where("shape has a negative or non-integer dimension");
      info.shape.push_back(d.get<int64_t>());
      numel *= d.get<uint64_t>();
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      return where("data_offsets must be two non-negative integers");
    }
    info.begin = off[0].get<uint64_t>();
    info.end = off[1].get<uint64_t>();
    if (info.begin > info.end)
      return where(absl::StrFormat("data_offsets [%d, %d) are reversed", info.begin, info.end));
    if (info.end > data_size) {
      return where(
          absl::StrFormat("data_offsets [%d, %d) run past the %d bytes of data (truncated file?)",
                          info.begin, info.end, data_size));
    }
    const uint64_t want = numel * c10::elementSize(info.dtype);
    if (info.end - info.begin != want) {
      return where(absl::StrFormat("shape %s of %s needs %d bytes but data_offsets span %d",
                                   ShapeStr(info.shape), v["dtype"].get<std::string>(), want,
                                   info.end - info.begin));
    }
    f.tensors_.push_back(std::move(info));
  }
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : f.tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return Bad(path, absl::StrCat("tensors \"", by_offset[i - 1]->name, "\" and \"",
                                    by_offset[i]->name, "\" have overlapping data_offsets"));
    }
  }
  for (size_t i = 0; i < f.tensors_.size(); ++i) f.index_[f.tensors_[i].name] = i;
  return f;
}

const TensorInfo* File::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<torch::Tensor> File::Get(const std::string& name,
                                        std::optional<torch::Dtype> dtype) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr)
    return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" not in ", path()));
  const unsigned char* ptr = map_->data() + data_start_ + info->begin;
  auto opts = torch::TensorOptions().dtype(info->dtype);
  torch::Tensor t;
  if (info->end == info->begin) {
    t = torch::empty(info->shape, opts);
  } else if (reinterpret_cast<uintptr_t>(ptr) % c10::elementSize(info->dtype) != 0) {
    // Misaligned data cannot back a tensor; copy it out instead.
    t = torch::empty(info->shape, opts);
    std::memcpy(t.data_ptr(), ptr, info->end - info->begin);
  } else {
    auto keep = map_;
    t = torch::from_blob(
        const_cast<unsigned char*>(ptr), info->shape, [keep](void*) {}, opts);
  }
  if (dtype.has_value() && *dtype != info->dtype) t = t.to(*dtype);
  return t;
}

absl::StatusOr<torch::Tensor> File::Take(const std::string& name,
                                         std::optional<torch::Dtype> dtype) const {
  ASSIGN_OR_RETURN(torch::Tensor t, Get(name, dtype));
  const TensorInfo* info = Find(name);
  torch::Tensor copy = t.clone();
  map_->ReleasePages(data_start_ + info->begin, info->end - info->begin);
  return copy;
}

absl::StatusOr<Checkpoint> Checkpoint::Open(const std::string& path) {
  Checkpoint c;
  c.origin_ = path;
  if (path.size() >= 5 && path.substr(path.size() - 5) == ".json") {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
        !j["weight_map"].is_object()) {
      return absl::DataLossError(
          absl::StrCat("malformed sharded checkpoint index ", path, ": needs a weight_map object"));
    }
    const auto dir = std::filesystem::path(path).parent_path();
    std::map<std::string, size_t> shard_index;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return absl::DataLossError(
            absl::StrCat(path, ": weight_map entry \"", it.key(), "\" is not a file name"));
      const std::string shard = it.value().get<std::string>();
      if (!shard_index.count(shard)) {
        ASSIGN_OR_RETURN(File f, File::Open((dir / shard).string()));
        shard_index[shard] = c.files_.size();
        c.files_.push_back(std::move(f));
      }
      const size_t fi = shard_index[shard];
      if (c.files_[fi].Find(it.key()) == nullptr) {
        return absl::DataLossError(absl::StrCat(path, " maps tensor \"", it.key(), "\" to ", shard,
                                                ", which does not hold it"));
      }
      c.where_[it.key()] = fi;
    }
    return c;
  }
  ASSIGN_OR_RETURN(File f, File::Open(path));
  for (const auto& t : f.tensors()) c.where_[t.name] = 0;
  c.files_.push_back(std::move(f));
  return c;
}

Checkpoint Checkpoint::FromTensors(TensorMap tensors, std::string origin) {
  Checkpoint c;
  c.origin_ = std::move(origin);
  for (const auto& kv : tensors) c.where_[kv.first] = SIZE_MAX;
  c.memory_ = std::move(tensors);
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

std::vector<int64_t> Checkpoint::Shape(const std::string& name) const {
  const size_t fi = where_.at(name);
  if (fi == SIZE_MAX) return memory_.at(name).sizes().vec();
  return files_[fi].Find(name)->shape;
}

absl::StatusOr<torch::Tensor> Checkpoint::Fetch(const std::string& name, bool copy,
                                                std::optional<torch::Dtype> dtype) const {
  auto it = where_.find(name);
  if (it == where_.end())
    return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" not in ", origin_));
  if (it->second == SIZE_MAX) {
    torch::Tensor t = memory_.at(name);
    if (dtype.has_value()) t = t.to(*dtype);
    return copy ? t.clone() : t;
  }
  const File& f = files_[it->second];
  return copy ? f.Take(name, dtype) : f.Get(name, dtype);
}

absl::StatusOr<TensorMap> Load(const std::string& path, std::optional<torch::Dtype> dtype) {
  ASSIGN_OR_RETURN(Checkpoint c, Checkpoint::Open(path));
  TensorMap out;
  for (const auto& n : c.names()) {
    ASSIGN_OR_RETURN(out[n], c.Fetch(n, /*copy=*/false, dtype));
  }
  return out;
}

absl::Status Save(const std::string& path, const TensorMap& tensors, const Metadata& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    ASSIGN_OR_RETURN(std::string dt, DtypeName(t.scalar_type()));
    torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    size_t nbytes = c.numel() * c.element_size();
    header[name] = {
        {"dtype", dt}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    data.push_back(std::move(c));
  }
  std::string h = header.dump();
  // Pad so the data section starts 8-byte aligned and zero-copy loads stay aligned.
  h.append((8 - (h.size() % 8)) % 8, ' ');
  uint64_t len = h.size();
  ASSIGN_OR_RETURN(AtomicFileWriter w, AtomicFileWriter::Open(path));
  RETURN_IF_ERROR(w.Append(&len, 8));
  RETURN_IF_ERROR(w.Append(h.data(), h.size()));
  for (const auto& c : data) RETURN_IF_ERROR(w.Append(c.data_ptr(), c.numel() * c.element_size()));
  return w.Commit();
}

absl::StatusOr<std::string> SaveSharded(const std::string& dir, const std::string& stem,
                                        const TensorMap& tensors, size_t max_shard_bytes,
                                        const Metadata& metadata) {
  std::vector<TensorMap> shards(1);
  size_t current = 0, total = 0;
  for (const auto& [name, t] : tensors) {
    size_t nbytes = t.numel() * t.element_size();
    if (current > 0 && current + nbytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back()[name] = t;
    current += nbytes;
    total += nbytes;
  }
  std::filesystem::create_directories(dir);
  nlohmann::json weight_map = nlohmann::json::object();
  const size_t n = shards.size();
  for (size_t i = 0; i < n; ++i) {
    std::string file = absl::StrFormat("%s-%05d-of-%05d.safetensors", stem, i + 1, n);
    RETURN_IF_ERROR(Save((std::filesystem::path(dir) / file).string(), shards[i], metadata));
    for (const auto& [name, t] : shards[i]) weight_map[name] = file;
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  std::string index_path =
      (std::filesystem::path(dir) / (stem + ".safetensors.index.json")).string();
  RETURN_IF_ERROR(WriteFileAtomic(index_path, index.dump(2)));
  return index_path;
}

}  // namespace sd::safetensors
