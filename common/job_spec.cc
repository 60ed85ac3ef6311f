#include "common/job_spec.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] =
          std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string Suggest(const std::string& key, const std::vector<std::string>& known) {
  std::string best;
  size_t best_d = 4;  // farther than this is not a typo
  for (const auto& k : known) {
    size_t d = EditDistance(key, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best.empty() ? "" : absl::StrCat(" (did you mean \"", best, "\"?)");
}

class Parser {
 public:
  explicit Parser(std::string origin) : origin_(std::move(origin)) {}

  absl::Status Error(const YAML::Node& node, const std::string& key,
                     const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(origin_, ":", node.Mark().line + 1, ": ",
                     key.empty() ? "" : absl::StrCat("key \"", key, "\" "), what));
  }

  // Checks the keys of a mapping against `known`.
  absl::Status Keys(const YAML::Node& map, const std::string& where,
                    const std::vector<std::string>& known) const {
    if (!map.IsMap()) return Error(map, where, "must be a mapping");
    for (const auto& kv : map) {
      const std::string k = kv.first.as<std::string>();
      if (std::find(known.begin(), known.end(), k) == known.end()) {
        std::string path = where.empty() ? k : absl::StrCat(where, ".", k);
        return Error(kv.first, "", absl::StrCat("unknown key \"", path, "\"", Suggest(k, known)));
      }
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status Get(const YAML::Node& map, const std::string& key, const std::string& path, T& out,
                   const char* type_name) const {
    const YAML::Node n = map[key];
    if (!n) return absl::OkStatus();
    if (!n.IsScalar()) return Error(n, path, absl::StrCat("must be ", type_name));
    try {
      out = n.as<T>();
    } catch (const YAML::Exception&) {
      return Error(n, path, absl::StrCat("must be ", type_name, ", got \"", n.Scalar(), "\""));
    }
    return absl::OkStatus();
  }

  absl::Status Range(const YAML::Node& map, const std::string& key, const std::string& path,
                     double v, double lo, double hi, bool lo_open = false,
                     bool hi_open = false) const {
    const bool bad = (lo_open ? v <= lo : v < lo) || (hi_open ? v >= hi : v > hi);
    if (!bad) return absl::OkStatus();
    return Error(map[key] ? map[key] : map, path,
                 absl::StrCat("is ", v, ", out of range ", lo_open ? "(" : "[", lo, ", ", hi,
                              hi_open ? ")" : "]"));
  }

  // `path` (map[key]) must be one of `known`; the error lists them.
  absl::Status OneOf(const YAML::Node& map, const std::string& key, const std::string& path,
                     std::string& out, const std::vector<std::string>& known) const {
    const std::string names = absl::StrJoin(known, ", ");
    RETURN_IF_ERROR(Get(map, key, path, out, names.c_str()));
    if (std::find(known.begin(), known.end(), out) != known.end()) return absl::OkStatus();
    return Error(
        map[key], path,
        absl::StrCat("must be one of ", names, ", got \"", out, "\"", Suggest(out, known)));
  }

  // `<where>.lr_scheduler`: one of diffusers' names that these stages implement.
  absl::Status LrScheduler(const YAML::Node& map, const std::string& where,
                           std::string& out) const {
    return OneOf(map, "lr_scheduler", absl::StrCat(where, ".lr_scheduler"), out,
                 {"constant", "cosine", "linear"});
  }

 private:
  std::string origin_;
};

}  // namespace

const std::vector<std::string>& AllStageNames() {
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

const std::vector<std::string>& ImplementedStageNames() {
  static const std::vector<std::string> kImplemented = {"init", "train_vae", "finetune"};
  return kImplemented;
}

const std::vector<std::string>& DefaultStageNames() {
  static const std::vector<std::string> kDefault(AllStageNames().begin() + 2,
                                                 AllStageNames().end());
  return kDefault;
}

// yaml-cpp accepts what a job file must not hold: a mapping that repeats a key
// keeps the first value (so a second `model:` was silently ignored), and a
// complex key (`? [a, b]`) throws on conversion. Checked over the whole
// document before any key is read.
absl::Status CheckMappings(const YAML::Node& node, const std::string& origin) {
  if (node.IsSequence()) {
    for (const auto& e : node) RETURN_IF_ERROR(CheckMappings(e, origin));
  }
  if (!node.IsMap()) return absl::OkStatus();
  std::map<std::string, int> first_line;
  for (const auto& kv : node) {
    const int line = kv.first.Mark().line + 1;
    if (!kv.first.IsScalar())
      return absl::InvalidArgumentError(absl::StrCat(
          origin, ":", line, ": a key must be a plain name, not a list or mapping"));
    const auto [it, fresh] = first_line.emplace(kv.first.Scalar(), line);
    if (!fresh)
      return absl::InvalidArgumentError(absl::StrCat(origin, ":", line, ": key \"",
                                                     kv.first.Scalar(), "\" given twice (first on line ",
                                                     it->second, ")"));
    RETURN_IF_ERROR(CheckMappings(kv.second, origin));
  }
  return absl::OkStatus();
}

absl::StatusOr<JobSpec> ParseJobSpec(const std::string& text, const std::string& origin) {
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
  Parser p(origin);
  JobSpec s;
  if (!root || root.IsNull())
    return absl::InvalidArgumentError(absl::StrCat(origin, ": empty job file"));
  RETURN_IF_ERROR(CheckMappings(root, origin));
  RETURN_IF_ERROR(
      p.Keys(root, "",
             {"name", "model", "dataset", "output", "seed", "checkpoint_interval", "batch_size",
              "workers", "max_restarts", "allow_restart_from_zero", "stages", "data", "init", "train_vae", "distillation",
              "pruning", "finetune", "optimization", "quantization"}));
  RETURN_IF_ERROR(p.Get(root, "name", "name", s.name, "a string"));
  RETURN_IF_ERROR(p.Get(root, "model", "model", s.model, "a path"));
  RETURN_IF_ERROR(p.Get(root, "dataset", "dataset", s.dataset, "a path"));
  RETURN_IF_ERROR(p.Get(root, "output", "output", s.output, "a path"));
  RETURN_IF_ERROR(p.Get(root, "seed", "seed", s.seed, "an integer"));
  RETURN_IF_ERROR(p.Get(root, "checkpoint_interval", "checkpoint_interval", s.checkpoint_interval,
                        "an integer"));
  RETURN_IF_ERROR(
      p.Range(root, "checkpoint_interval", "checkpoint_interval", s.checkpoint_interval, 1, 1e9));
  RETURN_IF_ERROR(p.Get(root, "batch_size", "batch_size", s.batch_size, "an integer"));
  RETURN_IF_ERROR(p.Range(root, "batch_size", "batch_size", s.batch_size, 1, 4096));
  int64_t workers = 1, max_restarts = 3;
  RETURN_IF_ERROR(p.Get(root, "workers", "workers", workers, "an integer"));
  RETURN_IF_ERROR(p.Range(root, "workers", "workers", workers, 1, 1024));
  RETURN_IF_ERROR(p.Get(root, "max_restarts", "max_restarts", max_restarts, "an integer"));
  RETURN_IF_ERROR(p.Range(root, "max_restarts", "max_restarts", max_restarts, 0, 1000));
  RETURN_IF_ERROR(p.Get(root, "allow_restart_from_zero", "allow_restart_from_zero",
                        s.allow_restart_from_zero, "true or false"));
  if (s.model.empty()) return p.Error(root, "model", "is required (a diffusers SD1.5 folder)");

  if (const YAML::Node d = root["data"]) {
    RETURN_IF_ERROR(p.Keys(d, "data",
                           {"center_crop", "random_flip", "caption_dropout", "max_skipped_fraction"}));
    RETURN_IF_ERROR(p.Get(d, "max_skipped_fraction", "data.max_skipped_fraction",
                          s.max_skipped_fraction, "a number"));
    RETURN_IF_ERROR(p.Range(d, "max_skipped_fraction", "data.max_skipped_fraction",
                            s.max_skipped_fraction, 0, 1));
    RETURN_IF_ERROR(p.Get(d, "center_crop", "data.center_crop", s.center_crop, "true or false"));
    RETURN_IF_ERROR(p.Get(d, "random_flip", "data.random_flip", s.random_flip, "true or false"));
    RETURN_IF_ERROR(
        p.Get(d, "caption_dropout", "data.caption_dropout", s.caption_dropout, "a number"));
    RETURN_IF_ERROR(p.Range(d, "caption_dropout", "data.caption_dropout", s.caption_dropout, 0, 1,
                            false, true));
  }
  if (const YAML::Node d = root["init"]) {
    RETURN_IF_ERROR(p.Keys(d, "init", {"clip_bpe"}));
    RETURN_IF_ERROR(p.Get(d, "clip_bpe", "init.clip_bpe", s.clip_bpe, "a path or auto"));
  }
  if (const YAML::Node d = root["train_vae"]) {
    RETURN_IF_ERROR(
        p.Keys(d, "train_vae",
               {"steps", "lr", "lr_scheduler", "batch_size", "kl_weight", "foreground_weight"}));
    RETURN_IF_ERROR(p.LrScheduler(d, "train_vae", s.vae_lr_scheduler));
    RETURN_IF_ERROR(p.Get(d, "foreground_weight", "train_vae.foreground_weight",
                          s.vae_foreground_weight, "a number"));
    RETURN_IF_ERROR(p.Range(d, "foreground_weight", "train_vae.foreground_weight",
                            s.vae_foreground_weight, 0, 1e6));
    RETURN_IF_ERROR(p.Get(d, "steps", "train_vae.steps", s.vae_steps, "an integer"));
    RETURN_IF_ERROR(p.Range(d, "steps", "train_vae.steps", s.vae_steps, 1, 1e9));
    RETURN_IF_ERROR(p.Get(d, "lr", "train_vae.lr", s.vae_lr, "a number"));
    RETURN_IF_ERROR(p.Range(d, "lr", "train_vae.lr", s.vae_lr, 0, 1, true));
    RETURN_IF_ERROR(p.Get(d, "batch_size", "train_vae.batch_size", s.vae_batch_size, "an integer"));
    RETURN_IF_ERROR(p.Range(d, "batch_size", "train_vae.batch_size", s.vae_batch_size, 0, 4096));
    RETURN_IF_ERROR(p.Get(d, "kl_weight", "train_vae.kl_weight", s.vae_kl_weight, "a number"));
    RETURN_IF_ERROR(p.Range(d, "kl_weight", "train_vae.kl_weight", s.vae_kl_weight, 0, 1));
  }
  if (const YAML::Node d = root["distillation"]) {
    RETURN_IF_ERROR(
        p.Keys(d, "distillation",
               {"steps", "clip_distill_steps", "lr", "ema_decay", "progressive_stages"}));
    RETURN_IF_ERROR(p.Get(d, "steps", "distillation.steps", s.steps, "an integer"));
    RETURN_IF_ERROR(p.Range(d, "steps", "distillation.steps", s.steps, 1, 1e9));
    RETURN_IF_ERROR(p.Get(d, "clip_distill_steps", "distillation.clip_distill_steps",
                          s.clip_distill_steps, "an integer"));
    RETURN_IF_ERROR(p.Range(d, "clip_distill_steps", "distillation.clip_distill_steps",
                            s.clip_distill_steps, 1, 1e9));
    RETURN_IF_ERROR(p.Get(d, "lr", "distillation.lr", s.lr, "a number"));
    RETURN_IF_ERROR(p.Range(d, "lr", "distillation.lr", s.lr, 0, 1, true));
    RETURN_IF_ERROR(p.Get(d, "ema_decay", "distillation.ema_decay", s.ema_decay, "a number"));
    RETURN_IF_ERROR(
        p.Range(d, "ema_decay", "distillation.ema_decay", s.ema_decay, 0, 1, false, true));
    if (const YAML::Node ps = d["progressive_stages"]) {
      if (!ps.IsSequence() || ps.size() < 2)
        return p.Error(ps, "distillation.progressive_stages",
                       "must be a list of at least two step counts, like [50, 25, 12, 6]");
      s.progressive_stages.clear();
      for (const auto& v : ps) {
        int64_t n = 0;
        try {
          n = v.as<int64_t>();
        } catch (const YAML::Exception&) {
          return p.Error(v, "distillation.progressive_stages", "entries must be integers");
        }
        if (n < 1 || (!s.progressive_stages.empty() && n >= s.progressive_stages.back())) {
          return p.Error(v, "distillation.progressive_stages",
                         "must be positive and strictly decreasing");
        }
        s.progressive_stages.push_back(n);
      }
    }
  }
  if (const YAML::Node pr = root["pruning"]) {
    RETURN_IF_ERROR(p.Keys(pr, "pruning", {"unet_ratio", "text_encoder_ratio", "vae_ratio"}));
    RETURN_IF_ERROR(p.Get(pr, "unet_ratio", "pruning.unet_ratio", s.prune_ratio, "a number"));
    RETURN_IF_ERROR(
        p.Range(pr, "unet_ratio", "pruning.unet_ratio", s.prune_ratio, 0, 1, false, true));
    RETURN_IF_ERROR(p.Get(pr, "text_encoder_ratio", "pruning.text_encoder_ratio",
                          s.text_encoder_prune_ratio, "a number"));
    RETURN_IF_ERROR(p.Range(pr, "text_encoder_ratio", "pruning.text_encoder_ratio",
                            s.text_encoder_prune_ratio, 0, 1, false, true));
    RETURN_IF_ERROR(p.Get(pr, "vae_ratio", "pruning.vae_ratio", s.vae_prune_ratio, "a number"));
    RETURN_IF_ERROR(
        p.Range(pr, "vae_ratio", "pruning.vae_ratio", s.vae_prune_ratio, 0, 1, false, true));
  }
  if (const YAML::Node f = root["finetune"]) {
    RETURN_IF_ERROR(p.Keys(
        f, "finetune",
        {"steps", "lr", "lr_scheduler", "ema", "ema_decay", "lr_warmup_steps", "max_grad_norm",
         "mixed_precision", "train_text_encoder", "train_token_embedding", "cache_latents",
         "foreground_weight", "snr_gamma", "timestep_sampling", "logit_mean", "logit_std"}));
    RETURN_IF_ERROR(p.OneOf(f, "timestep_sampling", "finetune.timestep_sampling",
                            s.finetune_timestep_sampling, {"uniform", "logit_normal"}));
    RETURN_IF_ERROR(
        p.Get(f, "logit_mean", "finetune.logit_mean", s.finetune_logit_mean, "a number"));
    RETURN_IF_ERROR(
        p.Range(f, "logit_mean", "finetune.logit_mean", s.finetune_logit_mean, -10, 10));
    RETURN_IF_ERROR(p.Get(f, "logit_std", "finetune.logit_std", s.finetune_logit_std, "a number"));
    RETURN_IF_ERROR(p.Range(f, "logit_std", "finetune.logit_std", s.finetune_logit_std, 0, 10));
    RETURN_IF_ERROR(p.Get(f, "snr_gamma", "finetune.snr_gamma", s.finetune_snr_gamma, "a number"));
    RETURN_IF_ERROR(p.Range(f, "snr_gamma", "finetune.snr_gamma", s.finetune_snr_gamma, 0, 1e6));
    RETURN_IF_ERROR(p.Get(f, "foreground_weight", "finetune.foreground_weight",
                          s.finetune_foreground_weight, "a number"));
    RETURN_IF_ERROR(p.Range(f, "foreground_weight", "finetune.foreground_weight",
                            s.finetune_foreground_weight, 0, 1e6));
    RETURN_IF_ERROR(p.LrScheduler(f, "finetune", s.finetune_lr_scheduler));
    RETURN_IF_ERROR(p.Get(f, "train_text_encoder", "finetune.train_text_encoder",
                          s.finetune_text_encoder, "true or false"));
    RETURN_IF_ERROR(p.Get(f, "train_token_embedding", "finetune.train_token_embedding",
                          s.finetune_token_embedding, "true or false"));
    RETURN_IF_ERROR(p.Get(f, "cache_latents", "finetune.cache_latents", s.finetune_cache_latents,
                          "true or false"));
    // A cached latent stands for the image as first transformed; random crops
    // and flips would all get that one.
    if (s.finetune_cache_latents && (s.random_flip || !s.center_crop))
      return p.Error(f["cache_latents"], "finetune.cache_latents",
                     "needs a deterministic transform: set data.random_flip: false and "
                     "data.center_crop: true, or turn cache_latents off");
    RETURN_IF_ERROR(p.Get(f, "ema_decay", "finetune.ema_decay", s.finetune_ema_decay, "a number"));
    if (f["ema_decay"])
      RETURN_IF_ERROR(
          p.Range(f, "ema_decay", "finetune.ema_decay", s.finetune_ema_decay, 0, 1, false, true));
    RETURN_IF_ERROR(p.Get(f, "ema", "finetune.ema", s.finetune_ema, "true or false"));
    RETURN_IF_ERROR(
        p.Get(f, "lr_warmup_steps", "finetune.lr_warmup_steps", s.lr_warmup_steps, "an integer"));
    RETURN_IF_ERROR(
        p.Range(f, "lr_warmup_steps", "finetune.lr_warmup_steps", s.lr_warmup_steps, -1, 1e9));
    RETURN_IF_ERROR(
        p.Get(f, "max_grad_norm", "finetune.max_grad_norm", s.max_grad_norm, "a number"));
    RETURN_IF_ERROR(
        p.Range(f, "max_grad_norm", "finetune.max_grad_norm", s.max_grad_norm, 0, 1e9, true));
    RETURN_IF_ERROR(
        p.Get(f, "mixed_precision", "finetune.mixed_precision", s.mixed_precision, "no or bf16"));
    if (s.mixed_precision != "no" && s.mixed_precision != "bf16") {
      return p.Error(f["mixed_precision"], "finetune.mixed_precision",
                     "must be no or bf16 (fp16 would need loss scaling, not implemented)");
    }
    RETURN_IF_ERROR(p.Get(f, "steps", "finetune.steps", s.finetune_steps, "an integer"));
    RETURN_IF_ERROR(p.Range(f, "steps", "finetune.steps", s.finetune_steps, 1, 1e9));
    RETURN_IF_ERROR(p.Get(f, "lr", "finetune.lr", s.finetune_lr, "a number"));
    RETURN_IF_ERROR(p.Range(f, "lr", "finetune.lr", s.finetune_lr, 0, 1, true));
  }
  if (const YAML::Node o = root["optimization"]) {
    RETURN_IF_ERROR(p.Keys(o, "optimization", {"tome_ratio"}));
    RETURN_IF_ERROR(p.Get(o, "tome_ratio", "optimization.tome_ratio", s.tome_ratio, "a number"));
    RETURN_IF_ERROR(
        p.Range(o, "tome_ratio", "optimization.tome_ratio", s.tome_ratio, 0, 1, false, true));
  }
  if (const YAML::Node q = root["quantization"]) {
    RETURN_IF_ERROR(p.Keys(q, "quantization", {"int8_calibration_samples"}));
    RETURN_IF_ERROR(p.Get(q, "int8_calibration_samples", "quantization.int8_calibration_samples",
                          s.int8_calibration_samples, "an integer"));
    RETURN_IF_ERROR(p.Range(q, "int8_calibration_samples", "quantization.int8_calibration_samples",
                            s.int8_calibration_samples, 1, 1e7));
  }

  // stages: a list of names, or of {name: {workers: N, max_restarts: M}}; default: every stage.
  std::vector<std::pair<std::string, YAML::Node>> listed;
  if (const YAML::Node st = root["stages"]) {
    if (!st.IsSequence() || st.size() == 0)
      return p.Error(st, "stages", "must be a non-empty list of stage names");
    for (const auto& e : st) {
      if (e.IsScalar()) {
        listed.emplace_back(e.Scalar(), e);
      } else if (e.IsMap() && e.size() == 1) {
        listed.emplace_back(e.begin()->first.as<std::string>(), e);
      } else {
        return p.Error(e, "stages", "entries must be a stage name or {name: {workers: N}}");
      }
    }
  } else {
    for (const auto& n : DefaultStageNames()) listed.emplace_back(n, root);
  }
  std::set<std::string> seen;
  for (const auto& [name, node] : listed) {
    const auto& all = AllStageNames();
    if (std::find(all.begin(), all.end(), name) == all.end()) {
      return p.Error(node, "", absl::StrCat("unknown stage \"", name, "\"", Suggest(name, all)));
    }
    const auto& impl = ImplementedStageNames();
    if (std::find(impl.begin(), impl.end(), name) == impl.end()) {
      return p.Error(
          node, "",
          absl::StrCat("stage \"", name, "\" is not implemented in this build (implemented: ",
                       absl::StrJoin(impl, ", "), "); remove it from \"stages\""));
    }
    if (!seen.insert(name).second)
      return p.Error(node, "", absl::StrCat("stage \"", name, "\" is listed twice"));
    StageSpec stage{name, workers, max_restarts};
    if (node.IsMap() && node != root) {
      const YAML::Node opts = node.begin()->second;
      const std::string where = absl::StrCat("stages.", name);
      if (!opts.IsNull()) {
        RETURN_IF_ERROR(p.Keys(opts, where, {"workers", "max_restarts"}));
        RETURN_IF_ERROR(p.Get(opts, "workers", where + ".workers", stage.workers, "an integer"));
        RETURN_IF_ERROR(p.Range(opts, "workers", where + ".workers", stage.workers, 1, 1024));
        RETURN_IF_ERROR(
            p.Get(opts, "max_restarts", where + ".max_restarts", stage.max_restarts, "an integer"));
        RETURN_IF_ERROR(
            p.Range(opts, "max_restarts", where + ".max_restarts", stage.max_restarts, 0, 1000));
      }
    }
    s.stages.push_back(stage);
  }
  // Pipeline order, whatever order the file lists them in.
  std::sort(s.stages.begin(), s.stages.end(), [](const StageSpec& a, const StageSpec& b) {
    const auto& all = AllStageNames();
    return std::find(all.begin(), all.end(), a.name) < std::find(all.begin(), all.end(), b.name);
  });
  return s;
}

int64_t StageTotalSteps(const JobSpec& job, const std::string& stage) {
  if (stage == "init") return 1;
  if (stage == "train_vae") return job.vae_steps;
  if (stage == "finetune") return job.finetune_steps;
  return 0;
}

absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return ParseJobSpec(text, path);
}

}  // namespace sd
