#include "stages/quantize/quantize_stage.h"

#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/quantize/quantize_options.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;

absl::Status QuantizeStage::Run(StageContext& ctx) {
  const auto& o = ctx.options<QuantizeOptions>("quantize");
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  ASSIGN_OR_RETURN(const torch::Dtype dtype, ParseDtypeName(o.dtype));
  const std::string torch_name = dtype == torch::kFloat16 ? "float16" : "bfloat16";
  const fs::path in = fs::absolute(input);
  return RunTransformStage(ctx, [&](const std::string& dir) -> absl::Status {
    std::map<std::string, ComponentWeights> replaced;
    nlohmann::json components = nlohmann::json::object();
    for (const std::string name : {"text_encoder", "unet", "vae"}) {
      if (!fs::exists(in / name / "config.json")) continue;
      ASSIGN_OR_RETURN(ComponentWeights c, LoadComponentWeights(in.string(), name));
      int64_t cast = 0;
      for (auto& [key, t] : c.weights) {
        if (!t.is_floating_point()) continue;
        t = t.to(dtype).contiguous();
        cast += t.numel();
      }
      // transformers records its dtype in the config (and from_pretrained with
      // torch_dtype="auto" reads it); diffusers' configs have no such key.
      if (name == "text_encoder") c.config["torch_dtype"] = torch_name;
      RETURN_IF_ERROR(CheckComponentLoads(name, c, absl::StrCat(o.dtype, " ", name)));
      components[name] = {{"dtype", torch_name}, {"parameters", cast}};
      replaced[name] = std::move(c);
    }
    if (replaced.empty())
      return absl::InvalidArgumentError(absl::StrCat(
          "quantize: ", in.string(), " has none of text_encoder/, unet/, vae/ to quantize"));
    RETURN_IF_ERROR(WriteModelWithComponents(in.string(), dir, replaced));
    const nlohmann::json report = {{"format", "sdcompress.quantization/1"},
                                   {"source", in.string()},
                                   {"dtype", torch_name},
                                   {"file_names", "plain (no variant suffix)"},
                                   {"components", components}};
    RETURN_IF_ERROR(
        WriteFileAtomic((fs::path(dir) / "quantization.json").string(), report.dump(2)));
    ctx.event(StageEvent::kInfo, absl::StrCat("quantize: every component in ", torch_name));
    return absl::OkStatus();
  });
}

std::unique_ptr<Stage> MakeQuantizeStage() { return std::make_unique<QuantizeStage>(); }

}  // namespace sd::stages
