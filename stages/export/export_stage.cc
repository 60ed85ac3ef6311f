#include "stages/export/export_stage.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/io/safetensors.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/onnx/graph.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/export/export_options.h"
#include "stages/training.h"

namespace sd::stages {
namespace fs = std::filesystem;
namespace {

// export/sharded/: diffusers' sharded UNet (config.json,
// diffusion_pytorch_model-0000i-of-0000n.safetensors and its index), and the seed's
// names for the same shards (unet_shard_0000i.safetensors, hard links, so the
// bytes are stored once) with shard_index.json.
absl::StatusOr<nlohmann::json> WriteShards(const std::string& input, const ExportOptions& o,
                                           const fs::path& dir) {
  if (!fs::exists(fs::path(input) / "unet" / "config.json"))
    return absl::InvalidArgumentError(
        absl::StrCat("export: sharded exports the UNet, but ", input, " has no unet/config.json"));
  ASSIGN_OR_RETURN(ComponentWeights unet, LoadComponentWeights(input, "unet"));
  const size_t max_bytes = static_cast<size_t>(o.max_shard_mb) << 20;
  ASSIGN_OR_RETURN(
      const std::string index_path,
      safetensors::SaveSharded(dir.string(), "diffusion_pytorch_model", unet.weights, max_bytes));
  RETURN_IF_ERROR(WriteFileAtomic((dir / "config.json").string(), unet.config.dump(2)));
  ASSIGN_OR_RETURN(const std::string index_text, ReadFile(index_path));
  const auto index = nlohmann::json::parse(index_text);
  // Shard file -> its tensors, in shard order (the diffusers names sort that way).
  std::map<std::string, std::vector<std::string>> files;
  for (const auto& [name, file] : index["weight_map"].items())
    files[file.get<std::string>()].push_back(name);
  nlohmann::json shards = nlohmann::json::array();
  nlohmann::json weight_map = nlohmann::json::object();
  size_t i = 0;
  for (const auto& [file, names] : files) {
    const std::string seed_name = absl::StrFormat("unet_shard_%05d.safetensors", i++);
    const fs::path target = dir / seed_name;
    std::error_code ec;
    fs::remove(target, ec);
    fs::create_hard_link(dir / file, target, ec);
    if (ec && !fs::copy_file(dir / file, target, ec))  // a filesystem without hard links
      return absl::InternalError(absl::StrCat("export: cannot link or copy ", file, " to ",
                                              target.string(), ": ", ec.message()));
    for (const auto& n : names) weight_map[n] = seed_name;
    shards.push_back({{"file", seed_name},
                      {"diffusers_file", file},
                      {"bytes", fs::file_size(target)},
                      {"tensors", names.size()}});
  }
  const nlohmann::json seed_index = {{"format", "sdcompress.shards/1"},
                                     {"component", "unet"},
                                     {"source", input},
                                     {"max_shard_bytes", max_bytes},
                                     {"total_size", index["metadata"]["total_size"]},
                                     {"shards", shards},
                                     {"weight_map", weight_map}};
  RETURN_IF_ERROR(WriteFileAtomic((dir / "shard_index.json").string(), seed_index.dump(2)));
  return nlohmann::json{{"dir", "sharded"},
                        {"shards", shards.size()},
                        {"total_size", index["metadata"]["total_size"]},
                        {"max_shard_bytes", max_bytes}};
}

// Writes one graph as <dir>/<name>.onnx (+ .data) and runs the checker on it.
absl::StatusOr<nlohmann::json> WriteChecked(const absl::StatusOr<onnx::Graph>& graph,
                                            const fs::path& dir, const std::string& source) {
  RETURN_IF_ERROR(graph.status());
  onnx::WriteOptions wo;
  wo.metadata = {{"source", source}, {"component", graph->name()}};
  onnx::WriteReport r;
  const std::string path = (dir / (graph->name() + ".onnx")).string();
  RETURN_IF_ERROR(onnx::WriteModel(*graph, path, wo, &r));
  RETURN_IF_ERROR(onnx::CheckModel(path));
  nlohmann::json inputs = nlohmann::json::array(), outputs = nlohmann::json::array();
  for (const auto& v : graph->inputs()) inputs.push_back(v.name);
  for (const auto& v : graph->outputs()) outputs.push_back(v.name);
  return nlohmann::json{
      {"file", graph->name() + ".onnx"},
      {"data_file", r.data_path.empty() ? "" : fs::path(r.data_path).filename().string()},
      {"model_bytes", r.model_bytes},
      {"data_bytes", r.data_bytes},
      {"nodes", r.nodes},
      {"initializers", r.initializers},
      {"inputs", inputs},
      {"outputs", outputs}};
}

// export/onnx/: every component the model has, one at a time (each is loaded,
// written and released before the next).
absl::StatusOr<nlohmann::json> WriteOnnx(const std::string& input, const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("export: cannot create ", dir.string()));
  const fs::path in(input);
  nlohmann::json models = nlohmann::json::object();
  if (fs::exists(in / "unet" / "config.json")) {
    ASSIGN_OR_RETURN(auto unet, LoadUNet((in / "unet").string()));
    ASSIGN_OR_RETURN(models["unet"], WriteChecked(unet->ExportOnnx(), dir, input));
  }
  if (fs::exists(in / "vae" / "config.json")) {
    ASSIGN_OR_RETURN(auto vae, LoadVAE((in / "vae").string()));
    ASSIGN_OR_RETURN(models["vae_decoder"], WriteChecked(vae->ExportOnnxDecoder(), dir, input));
    ASSIGN_OR_RETURN(models["vae_encoder"], WriteChecked(vae->ExportOnnxEncoder(), dir, input));
  }
  if (fs::exists(in / "text_encoder" / "config.json")) {
    ASSIGN_OR_RETURN(auto te, LoadCLIPTextModel((in / "text_encoder").string()));
    ASSIGN_OR_RETURN(models["text_encoder"], WriteChecked(te->ExportOnnx(), dir, input));
  }
  if (models.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "export: onnx exports unet, vae and text_encoder, but ", input, " has none of them"));
  const onnx::WriteOptions defaults;
  return nlohmann::json{{"dir", "onnx"},
                        {"ir_version", defaults.ir_version},
                        {"opset", defaults.opset},
                        {"dtype", "float32"},
                        {"models", models}};
}

}  // namespace

absl::Status ExportStage::Run(StageContext& ctx) {
  const auto& o = ctx.options<ExportOptions>("export");
  ASSIGN_OR_RETURN(const std::string input, InputModel(ctx));
  const std::string in = fs::absolute(input).string();
  return RunTransformStage(ctx, [&](const std::string& dir) -> absl::Status {
    nlohmann::json report = {{"format", "sdcompress.export/1"}, {"source", in}};
    if (o.sharded) {
      ASSIGN_OR_RETURN(report["sharded"], WriteShards(in, o, fs::path(dir) / "sharded"));
    }
    if (o.onnx) {
      ASSIGN_OR_RETURN(report["onnx"], WriteOnnx(in, fs::path(dir) / "onnx"));
    }
    RETURN_IF_ERROR(WriteFileAtomic((fs::path(dir) / "export.json").string(), report.dump(2)));
    ctx.event(StageEvent::kInfo, absl::StrCat("export: ", report.dump()));
    return absl::OkStatus();
  });
}

std::unique_ptr<Stage> MakeExportStage() { return std::make_unique<ExportStage>(); }

}  // namespace sd::stages
