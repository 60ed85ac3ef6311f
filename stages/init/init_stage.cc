#include "stages/init/init_stage.h"

#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/io/json_config.h"
#include "sd/io/safetensors.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/state_dict.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/tokenizer/clip_tokenizer.h"
#include "sd/util/status_macros.h"
#include "stages/init/init_options.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;
namespace {

absl::Status NeedFile(const fs::path& p) {
  if (!fs::exists(p))
    return absl::InvalidArgumentError(absl::StrCat("init needs ", p.string(), " (missing)"));
  return absl::OkStatus();
}

absl::Status CheckInput(const fs::path& in) {
  for (const char* f : {"model_index.json", "unet/config.json", "vae/config.json",
                        "text_encoder/config.json", "scheduler/scheduler_config.json"}) {
    RETURN_IF_ERROR(NeedFile(in / f));
  }
  return absl::OkStatus();
}

template <typename Model, typename Config>
absl::Status WriteRandom(const fs::path& in, const fs::path& out, const std::string& component) {
  ASSIGN_OR_RETURN(JsonConfig json, JsonConfig::Load((in / component / "config.json").string()));
  ASSIGN_OR_RETURN(Config cfg, Config::FromJson(json));
  Model m(cfg);
  return safetensors::Save((out / component / WeightsFileName(component)).string(), StateDict(*m));
}

}  // namespace

absl::StatusOr<std::string> FindClipBpe(const std::string& setting) {
  if (setting != "auto") {
    if (!fs::exists(setting))
      return absl::NotFoundError(absl::StrCat("init.clip_bpe: ", setting, " does not exist"));
    return setting;
  }
  if (const char* env = std::getenv("SD_CLIP_BPE"); env != nullptr && fs::exists(env))
    return std::string(env);
  std::vector<fs::path> roots = {".venv/lib", "/usr/lib", "/usr/local/lib"};
  std::error_code ec;
  for (const auto& root : roots) {
    for (const auto& py : fs::directory_iterator(root, ec)) {
      if (py.path().filename().string().rfind("python3", 0) != 0) continue;
      for (const char* site : {"site-packages", "dist-packages"}) {
        const fs::path p = py.path() / site / "open_clip" / "bpe_simple_vocab_16e6.txt.gz";
        if (fs::exists(p)) return p.string();
      }
    }
  }
  return absl::NotFoundError(
      "init: the tokenizer folder has no vocab.json/merges.txt and CLIP's merges file was not "
      "found; install open-clip-torch (scripts/setup.sh does) or set init.clip_bpe or "
      "$SD_CLIP_BPE to bpe_simple_vocab_16e6.txt.gz");
}

absl::Status InitStage::Run(StageContext& ctx) {
  const fs::path in(ctx.input_model.empty() ? ctx.job.model : ctx.input_model);
  RETURN_IF_ERROR(CheckInput(in));
  const auto& o = ctx.options<InitOptions>("init");
  return RunTransformStage(ctx, [&](const std::string& dir) -> absl::Status {
    const fs::path out(dir);
    std::error_code ec;
    fs::create_directories(out, ec);
    fs::copy(in, out, fs::copy_options::recursive | fs::copy_options::overwrite_existing, ec);
    if (ec)
      return absl::InternalError(
          absl::StrCat("cannot copy ", in.string(), " to ", out.string(), ": ", ec.message()));
    // Every component from one seeded stream, so the same job gives the same model.
    torch::manual_seed(static_cast<uint64_t>(ctx.job.seed));
    RETURN_IF_ERROR((WriteRandom<CLIPTextModel, CLIPTextConfig>(in, out, "text_encoder")));
    RETURN_IF_ERROR((WriteRandom<AutoencoderKL, VAEConfig>(in, out, "vae")));
    RETURN_IF_ERROR((WriteRandom<UNet2DConditionModel, UNetConfig>(in, out, "unet")));
    const fs::path tok = out / "tokenizer";
    if (!(fs::exists(tok / "vocab.json") && fs::exists(tok / "merges.txt")) &&
        !fs::exists(tok / "tokenizer.json")) {
      ASSIGN_OR_RETURN(std::string bpe, FindClipBpe(o.clip_bpe));
      RETURN_IF_ERROR(WriteCLIPTokenizerFiles(bpe, tok.string()));
    }
    return absl::OkStatus();
  });
}

std::unique_ptr<Stage> MakeInitStage() { return std::make_unique<InitStage>(); }

}  // namespace sd::stages
