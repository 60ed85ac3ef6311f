#include "sd/models/state_dict.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"

namespace sd {
namespace {
std::string Shape(c10::IntArrayRef s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }
}  // namespace

absl::StatusOr<std::string> FindWeights(const std::string& dir) {
  namespace fs = std::filesystem;
  for (const char* stem : {"diffusion_pytorch_model", "model"}) {
    fs::path single = fs::path(dir) / (std::string(stem) + ".safetensors");
    if (fs::exists(single)) return single.string();
    fs::path index = fs::path(dir) / (std::string(stem) + ".safetensors.index.json");
    if (fs::exists(index)) return index.string();
  }
  return absl::NotFoundError(absl::StrCat("no safetensors weights in ", dir,
                                          " (expected diffusion_pytorch_model.safetensors, model.safetensors "
                                          "or a sharded *.safetensors.index.json)"));
}

safetensors::TensorMap StateDict(const torch::nn::Module& module) {
  safetensors::TensorMap out;
  for (const auto& p : module.named_parameters(true)) out[p.key()] = p.value().detach();
  for (const auto& b : module.named_buffers(true)) out[b.key()] = b.value().detach();
  return out;
}

absl::Status LoadStateDict(torch::nn::Module& module, safetensors::TensorMap tensors,
                           const std::string& origin, const std::string& config,
                           const LoadOptions& options) {
  if (!options.renames.empty()) {
    safetensors::TensorMap renamed;
    for (auto& [name, t] : tensors) {
      std::string n = name;
      for (const auto& [from, to] : options.renames) n = absl::StrReplaceAll(n, {{from, to}});
      renamed[n] = t;
    }
    tensors = std::move(renamed);
  }
  std::vector<std::string> problems;
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  auto assign = [&](const std::string& name, torch::Tensor& target) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      problems.push_back(absl::StrCat("missing tensor \"", name, "\" (", config, " implies shape ",
                                      Shape(target.sizes()), ")"));
      return;
    }
    used.insert(name);
    const auto& src = it->second;
    if (src.sizes() != target.sizes()) {
      problems.push_back(absl::StrCat("tensor \"", name, "\" has shape ", Shape(src.sizes()), " in ", origin,
                                      " but ", config, " implies ", Shape(target.sizes())));
      return;
    }
    if (src.scalar_type() == target.scalar_type() && src.device() == target.device()) {
      target.set_data(src);  // zero-copy: aliases the copy-on-write mapping
    } else {
      target.set_data(src.to(target.options()));
    }
  };
  for (auto& p : module.named_parameters(true)) assign(p.key(), p.value());
  for (auto& b : module.named_buffers(true)) assign(b.key(), b.value());
  for (const auto& [name, t] : tensors) {
    if (!used.count(name) && !options.ignorable.count(name)) {
      problems.push_back(absl::StrCat("unexpected tensor \"", name, "\" with shape ", Shape(t.sizes()),
                                      " (not in the architecture that ", config, " describes)"));
    }
  }
  if (problems.empty()) return absl::OkStatus();
  const size_t shown = std::min<size_t>(problems.size(), 8);
  std::string msg = absl::StrCat(origin, " does not fit its config: ",
                                 absl::StrJoin(problems.begin(), problems.begin() + shown, "; "));
  if (problems.size() > shown) absl::StrAppend(&msg, "; and ", problems.size() - shown, " more");
  return absl::InvalidArgumentError(msg);
}

}  // namespace sd
