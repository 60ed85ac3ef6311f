#include "stages/quantize/quantize_stage.h"

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/quant/calibration.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/quantize/quantize_options.h"
#include "stages/training.h"

namespace sd::embedded {
extern const char* const kTomeUtilsPy;  // stages/quantize/python/*.py, compiled in
extern const char* const kCompileUtilsPy;
}  // namespace sd::embedded

namespace sd::stages {
namespace fs = std::filesystem;
namespace {

// Distinct captions of the dataset, drawn with the job's seed: the calibration
// set first, then the held-out prompts the clipping method is chosen on.
absl::Status PickPrompts(const StageContext& ctx, const QuantizeOptions& o,
                         quant::CalibrationOptions& c) {
  ASSIGN_OR_RETURN(auto source, OpenDataset(ctx.job.dataset));
  const int64_t need = o.calibration_samples + o.heldout_prompts;
  const auto size = static_cast<int64_t>(source->size());
  if (size < need)
    return absl::InvalidArgumentError(
        absl::StrCat("quantize: calibration_samples ", o.calibration_samples, " + heldout_prompts ",
                     o.heldout_prompts, " = ", need, " prompts, but dataset ", ctx.job.dataset,
                     " has only ", size, " samples"));
  auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(ctx.job.seed));
  auto order = torch::randperm(size, gen);
  for (int64_t i = 0; i < need; ++i) {
    ASSIGN_OR_RETURN(RawSample s, source->Read(static_cast<size_t>(order[i].item<int64_t>())));
    (i < o.calibration_samples ? c.prompts : c.eval_prompts).push_back(s.caption);
  }
  return absl::OkStatus();
}

// The INT8 UNet of the float model `in`, calibrated, written into `dir`.
absl::StatusOr<nlohmann::json> WriteInt8Unet(StageContext& ctx, const QuantizeOptions& o,
                                             const fs::path& in, const fs::path& dir) {
  if (!fs::exists(in / "unet" / "config.json"))
    return absl::InvalidArgumentError(
        absl::StrCat("quantize: int8 quantizes the UNet, but ", in.string(),
                     " has no unet/ (set quantize.int8: false to cast the other components only)"));
  quant::CalibrationOptions c;
  RETURN_IF_ERROR(PickPrompts(ctx, o, c));
  c.steps = o.calibration_steps > 0 ? o.calibration_steps : DistilledSteps(in.string());
  if (c.steps <= 0) c.steps = 50;
  c.guidance_scale = o.guidance_scale;
  c.scheduler = o.scheduler;
  c.clipping = o.clipping;
  c.min_layer_sqnr_db = o.min_layer_sqnr_db;
  c.batch = o.calibration_batch;
  c.convolutions = o.int8_convolutions;
  c.seed = static_cast<uint64_t>(ctx.job.seed);
  c.log = [&ctx](const std::string& line) { ctx.event(StageEvent::kInfo, line); };
  // Calibrated where it will run: the CPU, in float32.
  ASSIGN_OR_RETURN(StableDiffusion sd, StableDiffusion::Load(in.string()));
  ASSIGN_OR_RETURN(quant::Int8Plan plan, quant::CalibrateUNetInt8(sd, c));
  RETURN_IF_ERROR(quant::SaveUNetInt8((dir / "unet_int8.safetensors").string(),
                                      (dir / "unet_int8.pt").string(), *sd.unet, plan));
  // Read back through the loader every consumer uses: a file it rejects is never published.
  RETURN_IF_ERROR(quant::LoadUNetInt8((dir / "unet_int8.safetensors").string()).status());
  return nlohmann::json{{"files", {"unet_int8.safetensors", "unet_int8.pt"}},
                        {"format", quant::kInt8Format},
                        {"int8_convolutions", plan.conv_inputs.size()},
                        {"int8_linears", plan.linears.size()},
                        {"float_layers", plan.float_layers},
                        {"calibration", plan.calibration}};
}

}  // namespace

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
    // The seed's layout: Python helpers for users who load the folder in diffusers.
    RETURN_IF_ERROR(
        WriteFileAtomic((fs::path(dir) / "tome_utils.py").string(), embedded::kTomeUtilsPy));
    RETURN_IF_ERROR(
        WriteFileAtomic((fs::path(dir) / "compile_utils.py").string(), embedded::kCompileUtilsPy));
    nlohmann::json report = {{"format", "sdcompress.quantization/1"},
                             {"source", in.string()},
                             {"dtype", torch_name},
                             {"file_names", "plain (no variant suffix)"},
                             {"components", components},
                             {"python_helpers", {"tome_utils.py", "compile_utils.py"}}};
    if (o.int8) {
      ASSIGN_OR_RETURN(report["int8_unet"], WriteInt8Unet(ctx, o, in, dir));
    }
    RETURN_IF_ERROR(
        WriteFileAtomic((fs::path(dir) / "quantization.json").string(), report.dump(2)));
    ctx.event(StageEvent::kInfo, absl::StrCat("quantize: every component in ", torch_name));
    return absl::OkStatus();
  });
}

std::unique_ptr<Stage> MakeQuantizeStage() { return std::make_unique<QuantizeStage>(); }

}  // namespace sd::stages
