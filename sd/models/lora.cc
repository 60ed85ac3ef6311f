#include "sd/models/lora.h"

#include <cmath>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "sd/io/safetensors.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {

std::string Shape(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}
std::string Shape(const torch::Tensor& t) { return Shape(t.sizes().vec()); }

// What one key of a file is, once its module part is cut off.
enum class Part { kDown, kUp, kAlpha, kOther };

struct Group {
  std::string component, module;  // empty until resolved
  std::string stem;               // the key's module part as written
  std::string down_key, up_key, alpha_key;
  std::string hint_component;  // from a "unet." / "text_encoder." prefix
};

// The PEFT adapter config diffusers stores in the file's metadata, per component.
struct PeftConfig {
  std::optional<double> alpha;
  std::map<std::string, double> alpha_pattern;
  bool rslora = false;
  bool dora = false;
};

std::map<std::string, PeftConfig> ReadPeftMetadata(const safetensors::Metadata& meta) {
  std::map<std::string, PeftConfig> out;
  auto it = meta.find("lora_adapter_metadata");
  if (it == meta.end()) return out;
  const auto j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return out;
  for (const auto& [k, v] : j.items()) {
    const size_t dot = k.find('.');
    if (dot == std::string::npos) continue;
    PeftConfig& c = out[k.substr(0, dot)];
    const std::string field = k.substr(dot + 1);
    if (field == "lora_alpha" && v.is_number()) c.alpha = v.get<double>();
    if (field == "use_rslora" && v.is_boolean()) c.rslora = v.get<bool>();
    if (field == "use_dora" && v.is_boolean()) c.dora = v.get<bool>();
    if (field == "alpha_pattern" && v.is_object())
      for (const auto& [p, a] : v.items())
        if (a.is_number()) c.alpha_pattern[p] = a.get<double>();
  }
  return out;
}

}  // namespace

absl::StatusOr<LoraSpec> ParseLoraSpec(const std::string& s) {
  LoraSpec spec{s, 1.0};
  const size_t colon = s.rfind(':');
  if (colon != std::string::npos && colon + 1 < s.size()) {
    double v = 0;
    if (absl::SimpleAtod(s.substr(colon + 1), &v)) {
      spec.path = s.substr(0, colon);
      spec.scale = v;
    }
  }
  if (spec.path.empty() || !std::isfinite(spec.scale))
    return absl::InvalidArgumentError(
        absl::StrCat("--lora must be FILE or FILE:SCALE, got \"", s, "\""));
  return spec;
}

void AddModules(const std::string& component, torch::nn::Module& m, ModuleTable* table) {
  for (const auto& p : m.named_parameters(true)) {
    const std::string& name = p.key();
    if (!absl::EndsWith(name, ".weight")) continue;
    const int64_t dim = p.value().dim();
    if (dim != 2 && dim != 4) continue;
    (*table)[component][name.substr(0, name.size() - 7)] = p.value().sizes().vec();
  }
}

absl::StatusOr<LoraFile> ReadLora(const std::string& path, const ModuleTable& names) {
  ASSIGN_OR_RETURN(safetensors::File f, safetensors::File::Open(path));
  LoraFile out;
  out.path = path;
  // kohya's flattened names, looked up in the model's own module list. Two
  // modules that flatten alike would be ambiguous: neither is matched then.
  std::map<std::string, std::pair<std::string, std::string>> kohya;
  std::set<std::string> ambiguous;
  for (const auto& [component, modules] : names) {
    const std::string prefix = component == "unet" ? "lora_unet_" : "lora_te_";
    for (const auto& [module, shape] : modules) {
      const std::string flat = prefix + absl::StrReplaceAll(module, {{".", "_"}});
      if (!kohya.emplace(flat, std::make_pair(component, module)).second) ambiguous.insert(flat);
    }
  }
  static const std::vector<std::pair<std::string, Part>> kPeftSuffixes = {
      {".lora_A.weight", Part::kDown},
      {".lora_B.weight", Part::kUp},
      {".lora_A.default.weight", Part::kDown},
      {".lora_B.default.weight", Part::kUp},
      {".lora.down.weight", Part::kDown},
      {".lora.up.weight", Part::kUp},
      {".lora_down.weight", Part::kDown},
      {".lora_up.weight", Part::kUp},
      {".alpha", Part::kAlpha}};
  std::map<std::string, Group> groups;
  bool any_kohya = false, any_peft = false;
  for (const auto& info : f.tensors()) {
    const std::string& key = info.name;
    std::string stem;
    Part part = Part::kOther;
    for (const auto& [suffix, p] : kPeftSuffixes) {
      if (absl::EndsWith(key, suffix)) {
        stem = key.substr(0, key.size() - suffix.size());
        part = p;
        break;
      }
    }
    if (part == Part::kOther) {
      out.unmappable.emplace_back(
          key, absl::StrContains(key, "magnitude") || absl::StrContains(key, "dora")
                   ? "a DoRA magnitude vector, not a low-rank update"
                   : "not a LoRA down/up/alpha tensor (LoHa, LoKr and others are not read)");
      continue;
    }
    Group& g = groups[stem];
    g.stem = stem;
    (part == Part::kDown ? g.down_key : part == Part::kUp ? g.up_key : g.alpha_key) = key;
    if (absl::StartsWith(stem, "lora_unet_") || absl::StartsWith(stem, "lora_te_")) {
      any_kohya = true;
      auto it = kohya.find(stem);
      if (it != kohya.end() && !ambiguous.count(stem)) {
        g.component = it->second.first;
        g.module = it->second.second;
      }
      continue;
    }
    any_peft = true;
    std::string m = stem;
    for (const char* c : {"unet", "text_encoder"}) {
      if (absl::StartsWith(m, absl::StrCat(c, "."))) {
        g.hint_component = c;
        m = m.substr(std::string(c).size() + 1);
      }
    }
    if (absl::StartsWith(m, "base_model.model.")) m = m.substr(17);
    // diffusers' old attention-processor layout: <attn>.processor.to_q_lora.
    for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
             {".processor.to_q_lora", ".to_q"},
             {".processor.to_k_lora", ".to_k"},
             {".processor.to_v_lora", ".to_v"},
             {".processor.to_out_lora", ".to_out.0"}}) {
      if (absl::EndsWith(m, from)) m = m.substr(0, m.size() - from.size()) + to;
    }
    for (const auto& [component, modules] : names) {
      if (!g.hint_component.empty() && component != g.hint_component) continue;
      // transformers 5 names CLIP's modules without the "text_model." our state
      // dict (and transformers 4's) has.
      for (const std::string& name : {m, absl::StrCat("text_model.", m)}) {
        if (g.module.empty() && modules.count(name)) {
          g.component = component;
          g.module = name;
        }
      }
      if (!g.module.empty()) break;
    }
  }
  out.format = any_kohya && !any_peft ? "kohya" : any_peft && !any_kohya ? "peft" : "mixed";
  const auto peft = ReadPeftMetadata(f.metadata());
  for (auto& [stem, g] : groups) {
    const std::string& key = !g.down_key.empty() ? g.down_key
                             : !g.up_key.empty() ? g.up_key
                                                 : g.alpha_key;
    if (g.down_key.empty() || g.up_key.empty()) {
      out.unmappable.emplace_back(key, g.down_key.empty()
                                           ? "an up (lora_B) without its down (lora_A)"
                                           : "a down (lora_A) without its up (lora_B)");
      continue;
    }
    if (g.module.empty()) {
      out.unmappable.emplace_back(
          g.down_key, ambiguous.count(stem)
                          ? "its underscored name fits two modules of this model"
                          : absl::StrCat("names no module of this model (\"", stem, "\")"));
      continue;
    }
    LoraUpdate u;
    u.component = g.component;
    u.module = g.module;
    u.key = g.down_key;
    ASSIGN_OR_RETURN(u.down, f.Take(g.down_key, torch::kFloat32));
    ASSIGN_OR_RETURN(u.up, f.Take(g.up_key, torch::kFloat32));
    if (u.down.dim() < 2 || u.up.dim() < 2 || u.up.size(1) != u.down.size(0) ||
        (u.up.dim() == 4 && (u.up.size(2) != 1 || u.up.size(3) != 1)))
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", g.down_key, " ", Shape(u.down),
                                                     " and ", g.up_key, " ", Shape(u.up),
                                                     " are not a rank-r pair"));
    const double rank = static_cast<double>(u.rank());
    u.alpha = rank;  // diffusers' assumption when a file carries no alpha
    auto cfg = peft.find(u.component);
    if (!g.alpha_key.empty()) {
      ASSIGN_OR_RETURN(torch::Tensor a, f.Take(g.alpha_key, torch::kFloat32));
      u.alpha = a.item<double>();
    } else if (cfg != peft.end()) {
      if (cfg->second.dora)
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": a DoRA adapter (use_dora), which is no plain low-rank update"));
      if (cfg->second.alpha) u.alpha = *cfg->second.alpha;
      for (const auto& [pattern, a] : cfg->second.alpha_pattern)
        if (u.module == pattern || absl::EndsWith(u.module, "." + pattern)) u.alpha = a;
      // rsLoRA scales by alpha / sqrt(r): the same update as alpha * sqrt(r) / r.
      if (cfg->second.rslora) u.alpha *= std::sqrt(rank);
    }
    out.updates.push_back(std::move(u));
  }
  return out;
}

absl::Status RemapToPruned(LoraFile& lora, const nlohmann::json& map) {
  if (!map.contains("components") || !map["components"].is_object())
    return absl::InvalidArgumentError("pruning_map.json has no components");
  std::vector<LoraUpdate> kept;
  for (auto& u : lora.updates) {
    const auto& comps = map["components"];
    const std::string tensor = u.module + ".weight";
    if (!comps.contains(u.component) || !comps[u.component].contains("tensors") ||
        !comps[u.component]["tensors"].contains(tensor)) {
      kept.push_back(std::move(u));
      continue;
    }
    const auto& entry = comps[u.component]["tensors"][tensor];
    if (entry.contains("refit")) {
      lora.unmappable.emplace_back(u.key,
                                   absl::StrCat(tensor,
                                                " was refitted by the pruning, not cut: "
                                                "no channel subset of the update equals it"));
      continue;
    }
    const auto index = [](const nlohmann::json& v) {
      return torch::tensor(v.get<std::vector<int64_t>>(), torch::kInt64);
    };
    if (entry.contains("0")) u.up = u.up.index_select(0, index(entry["0"]));
    if (entry.contains("1")) u.down = u.down.index_select(1, index(entry["1"]));
    if (entry.contains("scale")) u.up = u.up * entry["scale"].get<double>();
    u.remapped = true;
    kept.push_back(std::move(u));
  }
  lora.updates = std::move(kept);
  return absl::OkStatus();
}

LoraFit CheckLora(const LoraFile& lora, const ModuleTable& target) {
  LoraFit fit;
  for (size_t i = 0; i < lora.updates.size(); ++i) {
    const LoraUpdate& u = lora.updates[i];
    auto c = target.find(u.component);
    if (c == target.end() || !c->second.count(u.module)) {
      fit.missing.emplace_back(u.key, absl::StrCat(u.component, " has no module ", u.module));
      continue;
    }
    const std::vector<int64_t>& w = c->second.at(u.module);
    std::vector<int64_t> delta = {u.up.size(0)};
    for (int64_t d = 1; d < u.down.dim(); ++d) delta.push_back(u.down.size(d));
    if (delta != w) {
      fit.mismatched.emplace_back(
          u.key,
          absl::StrCat(u.component, ".", u.module, ".weight is ", Shape(w), " but the update is ",
                       Shape(delta), " (up ", Shape(u.up), " @ down ", Shape(u.down), ")"));
      continue;
    }
    fit.fit.push_back(i);
  }
  return fit;
}

absl::Status ApplyLora(const LoraFile& lora, const LoraFit& fit, const std::string& component,
                       torch::nn::Module& m, double scale) {
  auto params = m.named_parameters(true);
  torch::NoGradGuard no_grad;
  for (size_t i : fit.fit) {
    const LoraUpdate& u = lora.updates[i];
    if (u.component != component) continue;
    torch::Tensor* w = params.find(u.module + ".weight");
    if (w == nullptr)
      return absl::InternalError(absl::StrCat(component, " has no parameter ", u.module,
                                              ".weight (apply LoRAs before fusing projections)"));
    auto delta = u.up.flatten(1).mm(u.down.flatten(1)).view(w->sizes());
    delta = delta * (scale * u.alpha / static_cast<double>(u.rank()));
    w->add_(delta.to(w->device(), w->scalar_type()));
  }
  return absl::OkStatus();
}

}  // namespace sd
