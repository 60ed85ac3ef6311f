#include "sd/models/state_dict.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "sd/util/status_macros.h"

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
  return absl::NotFoundError(
      absl::StrCat("no safetensors weights in ", dir,
                   " (expected diffusion_pytorch_model.safetensors, model.safetensors "
                   "or a sharded *.safetensors.index.json)"));
}

safetensors::TensorMap StateDict(const torch::nn::Module& module) {
  safetensors::TensorMap out;
  for (const auto& p : module.named_parameters(true)) out[p.key()] = p.value().detach();
  for (const auto& b : module.named_buffers(true)) out[b.key()] = b.value().detach();
  return out;
}

absl::Status LoadStateDict(torch::nn::Module& module, const safetensors::Checkpoint& checkpoint,
                           const std::string& config, const LoadOptions& options) {
  const std::string& origin = checkpoint.origin();
  // model name -> checkpoint name
  std::map<std::string, std::string> source;
  bool has_prefix = options.prefix.empty();
  for (const auto& name : checkpoint.names())
    has_prefix = has_prefix || name.rfind(options.prefix, 0) == 0;
  for (const auto& name : checkpoint.names()) {
    std::string n = has_prefix ? name : options.prefix + name;
    for (const auto& [from, to] : options.renames) n = absl::StrReplaceAll(n, {{from, to}});
    source[n] = name;
  }
  std::vector<std::string> problems;
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  auto assign = [&](const std::string& name, torch::Tensor& target) -> absl::Status {
    auto it = source.find(name);
    if (it == source.end()) {
      problems.push_back(absl::StrCat("missing tensor \"", name, "\" (", config, " implies shape ",
                                      Shape(target.sizes()), ")"));
      return absl::OkStatus();
    }
    used.insert(name);
    const auto shape = checkpoint.Shape(it->second);
    if (c10::IntArrayRef(shape) != target.sizes()) {
      problems.push_back(absl::StrCat("tensor \"", name, "\" has shape ", Shape(shape), " in ",
                                      origin, " but ", config, " implies ", Shape(target.sizes())));
      return absl::OkStatus();
    }
    auto src = checkpoint.Fetch(it->second, options.copy);
    if (!src.ok()) return src.status();
    if (src->scalar_type() == target.scalar_type() && src->device() == target.device()) {
      target.set_data(*src);  // the old (randomly initialised) storage is freed here
    } else {
      target.set_data(src->to(target.options()));
    }
    return absl::OkStatus();
  };
  for (auto& p : module.named_parameters(true)) RETURN_IF_ERROR(assign(p.key(), p.value()));
  for (auto& b : module.named_buffers(true)) RETURN_IF_ERROR(assign(b.key(), b.value()));
  for (const auto& [name, original] : source) {
    if (!used.count(name) && !options.ignorable.count(name)) {
      problems.push_back(absl::StrCat("unexpected tensor \"", original, "\" with shape ",
                                      Shape(checkpoint.Shape(original)),
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

absl::Status LoadStateDict(torch::nn::Module& module, safetensors::TensorMap tensors,
                           const std::string& origin, const std::string& config,
                           const LoadOptions& options) {
  return LoadStateDict(module, safetensors::Checkpoint::FromTensors(std::move(tensors), origin),
                       config, options);
}

absl::Status LoadComponentWeights(torch::nn::Module& module, const std::string& dir,
                                  const std::string& config, const LoadOptions& options) {
  ASSIGN_OR_RETURN(std::string weights, FindWeights(dir));
  ASSIGN_OR_RETURN(safetensors::Checkpoint ckpt, safetensors::Checkpoint::Open(weights));
  return LoadStateDict(module, ckpt, config, options);
}

}  // namespace sd
