#include "sd/train/checkpoint.h"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace fs = std::filesystem;
namespace {

absl::StatusOr<uint32_t> FileCrc(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  return static_cast<uint32_t>(
      crc32(0L, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size())));
}

std::vector<std::pair<int64_t, fs::path>> ListCheckpoints(const std::string& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    long long step = 0;
    if (e.is_directory() && name.rfind("step-", 0) == 0 &&
        sscanf(name.c_str(), "step-%lld", &step) == 1) {
      out.emplace_back(step, e.path());
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

}  // namespace

absl::Status WriteCheckpoint(const std::string& root, const TrainingCheckpoint& ckpt, int keep) {
  fs::create_directories(root);
  const std::string name = absl::StrFormat("step-%08d", ckpt.step);
  const fs::path final_dir = fs::path(root) / name;
  const fs::path tmp_dir = fs::path(root) / absl::StrCat(".tmp-", name, "-", ::getpid());
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);
  nlohmann::json manifest = {
      {"step", ckpt.step}, {"state", ckpt.state}, {"files", nlohmann::json::object()}};
  for (const auto& [stem, tensors] : ckpt.tensors) {
    const std::string file = (tmp_dir / (stem + ".safetensors")).string();
    RETURN_IF_ERROR(safetensors::Save(file, tensors));
    ASSIGN_OR_RETURN(uint32_t crc, FileCrc(file));
    manifest["files"][stem + ".safetensors"] = crc;
  }
  RETURN_IF_ERROR(WriteFileAtomic((tmp_dir / "manifest.json").string(), manifest.dump(2)));
  FsyncDir(tmp_dir.string());
  std::error_code ec;
  fs::remove_all(final_dir, ec);  // a re-run of the same step replaces it
  fs::rename(tmp_dir, final_dir, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("cannot publish checkpoint ", final_dir.string(), ": ", ec.message()));
  FsyncDir(root);
  auto all = ListCheckpoints(root);
  for (size_t i = static_cast<size_t>(std::max(keep, 1)); i < all.size(); ++i)
    fs::remove_all(all[i].second, ec);
  return absl::OkStatus();
}

std::vector<std::string> RemoveUnfinishedCheckpoints(const std::string& root) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (e.path().filename().string().rfind(".tmp-", 0) != 0) continue;
    fs::remove_all(e.path(), ec);
    removed.push_back(e.path().string());
  }
  return removed;
}

absl::StatusOr<std::optional<TrainingCheckpoint>> LoadLatestCheckpoint(
    const std::string& root, std::vector<std::string>* skipped,
    const std::function<absl::Status(const TrainingCheckpoint&)>& accept) {
  for (const auto& [step, dir] : ListCheckpoints(root)) {
    auto reject = [&, d = dir](const std::string& why) {
      if (skipped) skipped->push_back(absl::StrCat(d.string(), ": ", why));
    };
    auto text = ReadFile((dir / "manifest.json").string());
    if (!text.ok()) {
      reject("no manifest.json");
      continue;
    }
    // Valid JSON is not enough: every key read below must be there with its type.
    nlohmann::json m = nlohmann::json::parse(*text, nullptr, false);
    if (m.is_discarded() || !m.is_object()) {
      reject("manifest.json is not a JSON object");
      continue;
    }
    if (!m.contains("files") || !m["files"].is_object() || m["files"].empty() ||
        !m.contains("state") || !m["state"].is_object()) {
      reject("manifest.json lacks \"files\" or \"state\"");
      continue;
    }
    TrainingCheckpoint c;
    c.step = step;
    c.dir = dir.string();
    c.state = m["state"];
    bool good = true;
    for (auto it = m["files"].begin(); it != m["files"].end() && good; ++it) {
      const std::string file = (dir / it.key()).string();
      if (!it.value().is_number_unsigned() ||
          it.key().size() <= std::string(".safetensors").size()) {
        reject(absl::StrCat("manifest.json: entry \"", it.key(), "\" is not a file checksum"));
        good = false;
        break;
      }
      auto crc = FileCrc(file);
      if (!crc.ok() || *crc != it.value().get<uint32_t>()) {
        reject(absl::StrCat(it.key(), " fails its checksum (truncated or corrupted)"));
        good = false;
        break;
      }
      auto tensors = safetensors::Load(file);
      if (!tensors.ok()) {
        reject(std::string(tensors.status().message()));
        good = false;
        break;
      }
      std::string stem = it.key().substr(0, it.key().size() - std::string(".safetensors").size());
      c.tensors[stem] = std::move(*tensors);
    }
    if (!good) continue;
    if (accept) {
      if (absl::Status s = accept(c); !s.ok()) {
        reject(std::string(s.message()));
        continue;
      }
    }
    return std::optional<TrainingCheckpoint>(std::move(c));
  }
  return std::optional<TrainingCheckpoint>();
}

}  // namespace sd
