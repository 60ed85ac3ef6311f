#include "stages/catalog.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::stages {

#define SD_STAGE(name, Type) StageDescriptor Type##Descriptor();
#include "stages/catalog.inc"
#undef SD_STAGE

const std::vector<StageDescriptor>& Catalog() {
  static const std::vector<StageDescriptor> kCatalog = {
#define SD_STAGE(name, Type) Type##Descriptor(),
#include "stages/catalog.inc"
#undef SD_STAGE
  };
  return kCatalog;
}

const StageDescriptor* FindStage(const std::string& name) {
  for (const auto& d : Catalog()) {
    if (d.name == name) return &d;
  }
  return nullptr;
}

const std::vector<std::string>& PipelineStageNames() {
  static const std::vector<std::string> kAll = {"init",
                                                "train_vae",
                                                "progressive_distillation",
                                                "clip_distillation",
                                                "cfg_distillation",
                                                "prune",
                                                "finetune",
                                                "quantize",
                                                "optimize",
                                                "export",
                                                "lora_report"};
  return kAll;
}

namespace {

// What a job without a "stages" list runs: the compression pipeline (not the
// teacher-building stages init and train_vae).
std::vector<std::string> DefaultStageNames() {
  return {PipelineStageNames().begin() + 2, PipelineStageNames().end()};
}

std::vector<std::string> ImplementedStageNames() {
  std::vector<std::string> out;
  for (const auto& d : Catalog()) out.push_back(d.name);
  return out;
}

// The keys a section's parser reads, from a dry run on an absent section.
std::vector<std::string> SectionKeys(const StageDescriptor& d) {
  SectionReader r("", YAML::Node(), d.section);
  (void)d.parse(r, JobSpec{});
  return r.keys();
}

absl::Status ParseShared(SectionReader& top, JobSpec& s, int64_t& workers, int64_t& max_restarts) {
  RETURN_IF_ERROR(top.String("name", s.name));
  RETURN_IF_ERROR(top.String("model", s.model, "a path"));
  RETURN_IF_ERROR(top.String("dataset", s.dataset, "a path"));
  RETURN_IF_ERROR(top.String("output", s.output, "a path"));
  RETURN_IF_ERROR(top.Int("seed", s.seed, -9.2e18, 9.2e18));
  RETURN_IF_ERROR(top.Int("checkpoint_interval", s.checkpoint_interval, 1, 1e9));
  RETURN_IF_ERROR(top.Int("batch_size", s.batch_size, 1, 4096));
  RETURN_IF_ERROR(top.Int("workers", workers, 1, 1024));
  RETURN_IF_ERROR(top.Int("max_restarts", max_restarts, 0, 1000));
  return top.Bool("allow_restart_from_zero", s.allow_restart_from_zero);
}

absl::Status ParseData(SectionReader& d, JobSpec& s) {
  RETURN_IF_ERROR(d.Bool("center_crop", s.center_crop));
  RETURN_IF_ERROR(d.Bool("random_flip", s.random_flip));
  RETURN_IF_ERROR(d.Number("caption_dropout", s.caption_dropout, 0, 1, false, true));
  return d.Number("max_skipped_fraction", s.max_skipped_fraction, 0, 1);
}

std::vector<std::string> DryRunKeys(absl::Status (*parse)(SectionReader&, JobSpec&),
                                    const std::string& where) {
  SectionReader r("", YAML::Node(), where);
  JobSpec s;
  (void)parse(r, s);
  return r.keys();
}

std::vector<std::string> TopLevelKeys() {
  SectionReader r("", YAML::Node(), "");
  JobSpec s;
  int64_t w = 0, m = 0;
  (void)ParseShared(r, s, w, m);
  std::vector<std::string> keys = r.keys();
  keys.insert(keys.end(), {"data", "stages"});
  for (const auto& d : Catalog()) {
    if (!d.section.empty()) keys.push_back(d.section);
  }
  return keys;
}

}  // namespace

std::map<std::string, std::vector<std::string>> KnownJobKeys() {
  std::map<std::string, std::vector<std::string>> out;
  out[""] = TopLevelKeys();
  out["data"] = DryRunKeys(&ParseData, "data");
  for (const auto& d : Catalog()) {
    if (!d.section.empty()) out[d.section] = SectionKeys(d);
  }
  return out;
}

}  // namespace sd::stages

namespace sd {

absl::StatusOr<JobSpec> ParseJobSpec(const std::string& text, const std::string& origin) {
  using stages::Catalog;
  if (text.size() > kMaxJobFileBytes)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the file is %.1f MiB; a job file may be at most %d KiB (datasets and models are "
        "named by path, not embedded)",
        origin, static_cast<double>(text.size()) / (1 << 20), kMaxJobFileBytes >> 10));
  // A NUL would cut the text short wherever it is handled as a C string (it once
  // made the stored job unreadable); a job file is text.
  if (const size_t nul = text.find('\0'); nul != std::string::npos) {
    const int64_t line = 1 + std::count(text.begin(), text.begin() + nul, '\n');
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ":", line, ": contains a NUL byte; a job file must be text"));
  }
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ":", e.mark.line + 1, ": invalid YAML: ", e.msg));
  }
  if (!root || root.IsNull())
    return absl::InvalidArgumentError(absl::StrCat(origin, ": empty job file"));
  RETURN_IF_ERROR(CheckMappings(root, origin));
  if (!root.IsMap())
    return absl::InvalidArgumentError(absl::StrCat(origin, ": must be a mapping of keys"));

  JobSpec s;
  SectionReader top(origin, root, "");
  RETURN_IF_ERROR(top.CheckKeys(stages::TopLevelKeys()));
  int64_t workers = 1, max_restarts = 3;
  RETURN_IF_ERROR(stages::ParseShared(top, s, workers, max_restarts));
  if (s.model.empty()) return top.Error("model", "is required (a diffusers SD1.5 folder)");
  {
    SectionReader d(origin, root["data"], "data");
    RETURN_IF_ERROR(d.CheckKeys(stages::DryRunKeys(&stages::ParseData, "data")));
    RETURN_IF_ERROR(stages::ParseData(d, s));
  }
  // Every stage's section, listed or not: a mistake in one is reported either way.
  for (const auto& desc : Catalog()) {
    SectionReader r(origin, desc.section.empty() ? YAML::Node() : root[desc.section], desc.section);
    RETURN_IF_ERROR(r.CheckKeys(stages::SectionKeys(desc)));
    ASSIGN_OR_RETURN(s.options[desc.name], desc.parse(r, s));
  }

  // stages: a list of names, or of {name: {workers: N, max_restarts: M}}; default: the pipeline.
  const auto& all = stages::PipelineStageNames();
  std::vector<std::pair<std::string, YAML::Node>> listed;
  if (const YAML::Node st = root["stages"]) {
    if (!st.IsSequence() || st.size() == 0)
      return top.Error("stages", "must be a non-empty list of stage names");
    for (const auto& e : st) {
      if (e.IsScalar()) {
        listed.emplace_back(e.Scalar(), e);
      } else if (e.IsMap() && e.size() == 1) {
        listed.emplace_back(e.begin()->first.Scalar(), e);
      } else {
        return SectionReader(origin, e, "")
            .Error("", "stages entries must be a stage name or {name: {workers: N}}");
      }
    }
  } else {
    for (const auto& n : stages::DefaultStageNames()) listed.emplace_back(n, root);
  }
  std::set<std::string> seen;
  for (const auto& [name, node] : listed) {
    SectionReader at(origin, node, "");
    if (std::find(all.begin(), all.end(), name) == all.end())
      return at.Error("", absl::StrCat("unknown stage \"", name, "\"", Suggest(name, all)));
    const stages::StageDescriptor* desc = stages::FindStage(name);
    if (desc == nullptr)
      return at.Error(
          "", absl::StrCat("stage \"", name, "\" is not implemented in this build (implemented: ",
                           absl::StrJoin(stages::ImplementedStageNames(), ", "),
                           "); remove it from \"stages\""));
    if (!seen.insert(name).second)
      return at.Error("", absl::StrCat("stage \"", name, "\" is listed twice"));
    const bool needs_dataset =
        desc->needs_dataset ||
        (desc->needs_dataset_with != nullptr && desc->needs_dataset_with(s.options.at(name)));
    if (needs_dataset && s.dataset.empty())
      return at.Error("", absl::StrCat("stage \"", name,
                                       "\" needs \"dataset\" (an image folder with "
                                       "metadata.jsonl, or WebDataset shards)"));
    StageSpec stage{name, workers, max_restarts};
    if (node.IsMap() && node != root) {
      SectionReader opts(origin, node.begin()->second, absl::StrCat("stages.", name));
      RETURN_IF_ERROR(opts.CheckKeys({"workers", "max_restarts"}));
      RETURN_IF_ERROR(opts.Int("workers", stage.workers, 1, 1024));
      RETURN_IF_ERROR(opts.Int("max_restarts", stage.max_restarts, 0, 1000));
    }
    s.stages.push_back(stage);
  }
  // Pipeline order, whatever order the file lists them in.
  std::sort(s.stages.begin(), s.stages.end(), [&all](const StageSpec& a, const StageSpec& b) {
    return std::find(all.begin(), all.end(), a.name) < std::find(all.begin(), all.end(), b.name);
  });
  return s;
}

absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return ParseJobSpec(text, path);
}

int64_t StageTotalSteps(const JobSpec& job, const std::string& stage) {
  const stages::StageDescriptor* d = stages::FindStage(stage);
  auto it = job.options.find(stage);
  if (d == nullptr || d->total_steps == nullptr || it == job.options.end()) return 0;
  return d->total_steps(it->second);
}

}  // namespace sd
