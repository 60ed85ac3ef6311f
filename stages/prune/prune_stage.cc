#include "stages/prune/prune_stage.h"

#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "sd/prune/prune_models.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/prune/prune_options.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;
namespace {

// Loads component `name` of `model`, prunes it, and checks that the result loads.
template <typename Ratio, typename PruneFn>
absl::StatusOr<prune::PrunedComponent> PruneComponent(const fs::path& model,
                                                      const std::string& name, const Ratio& ratio,
                                                      PruneFn prune_fn) {
  ComponentWeights c;
  ASSIGN_OR_RETURN(c, LoadComponentWeights(model.string(), name));
  const std::string config_path = (model / name / "config.json").string();
  ASSIGN_OR_RETURN(prune::PrunedComponent p, prune_fn(c.config, c.weights, ratio, config_path));
  c.weights.clear();
  RETURN_IF_ERROR(CheckComponentLoads(name, {p.config, p.weights}, absl::StrCat("pruned ", name)));
  return p;
}

}  // namespace

absl::Status PruneStage::Run(StageContext& ctx) {
  const auto& o = ctx.options<PruneOptions>("prune");
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  const fs::path in = fs::absolute(input);
  return RunTransformStage(ctx, [&](const std::string& dir) -> absl::Status {
    std::map<std::string, prune::PrunedComponent> pruned;
    if (PruneOptions::Any(o.unet_ratio)) {
      ASSIGN_OR_RETURN(pruned["unet"], PruneComponent(in, "unet", o.unet_ratio, prune::PruneUNet));
    }
    if (o.text_encoder_ratio > 0) {
      ASSIGN_OR_RETURN(
          pruned["text_encoder"],
          PruneComponent(in, "text_encoder", o.text_encoder_ratio, prune::PruneTextEncoder));
    }
    if (PruneOptions::Any(o.vae_ratio)) {
      ASSIGN_OR_RETURN(pruned["vae"], PruneComponent(in, "vae", o.vae_ratio, prune::PruneVAE));
    }
    // A single ratio stays a number in the map, a per-level list a list.
    auto as_json = [](const std::vector<double>& r) -> nlohmann::json {
      return r.size() == 1 ? nlohmann::json(r[0]) : nlohmann::json(r);
    };
    const std::map<std::string, nlohmann::json> ratios = {{"unet", as_json(o.unet_ratio)},
                                                          {"text_encoder", o.text_encoder_ratio},
                                                          {"vae", as_json(o.vae_ratio)}};
    nlohmann::json map = {{"format", "sdcompress.pruning_map/1"},
                          {"source", in.string()},
                          {"criterion", o.criterion},
                          {"components", nlohmann::json::object()}};
    nlohmann::json report = {{"source", in.string()}, {"components", nlohmann::json::object()}};
    std::map<std::string, ComponentWeights> replaced;
    for (auto& [name, p] : pruned) {
      map["components"][name] = {{"ratio", ratios.at(name)}, {"tensors", std::move(p.map)}};
      if (!p.features.is_null()) map["components"][name]["block_outputs"] = std::move(p.features);
      report["components"][name] = std::move(p.report);
      replaced[name] = {std::move(p.config), std::move(p.weights)};
    }
    RETURN_IF_ERROR(WriteModelWithComponents(in.string(), dir, replaced));
    RETURN_IF_ERROR(WriteFileAtomic((fs::path(dir) / "pruning_map.json").string(), map.dump()));
    RETURN_IF_ERROR(
        WriteFileAtomic((fs::path(dir) / "prune_report.json").string(), report.dump(2)));
    for (const auto& [name, r] : report["components"].items()) {
      ctx.event(StageEvent::kInfo,
                absl::StrCat("prune: ", name, " ", r["parameters"]["before"].get<int64_t>(), " -> ",
                             r["parameters"]["after"].get<int64_t>(), " parameters"));
    }
    return absl::OkStatus();
  });
}

std::unique_ptr<Stage> MakePruneStage() { return std::make_unique<PruneStage>(); }

}  // namespace sd::stages
