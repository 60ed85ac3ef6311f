#include "sd/eval/evaluate.h"

#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/eval/image_metrics.h"
#include "sd/eval/shape_probe.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/quant/unet_int8.h"
#include "sd/util/status_macros.h"

namespace sd::eval {
namespace fs = std::filesystem;
namespace {

struct Generated {
  torch::Tensor images;   // [N, H, W, 3] in [0, 1], N = prompts x seeds, seed-major
  torch::Tensor latents;  // [N, C, h, w]
  double seconds_per_image = 0;
  int64_t size_bytes = 0;
  int64_t parameters = 0;
};

int64_t WeightBytes(const std::string& dir, bool unet_int8) {
  int64_t n = 0;
  std::error_code ec;
  if (unet_int8)
    n += static_cast<int64_t>(fs::file_size(fs::path(dir) / "unet_int8.safetensors", ec));
  for (const char* c : {"unet", "text_encoder", "vae"}) {
    if (unet_int8 && std::string(c) == "unet") continue;
    for (const auto& e : fs::directory_iterator(fs::path(dir) / c, ec)) {
      const auto ext = e.path().extension();
      if (ext == ".safetensors" || ext == ".bin") n += static_cast<int64_t>(e.file_size());
    }
  }
  return n;
}

absl::StatusOr<Generated> GenerateAll(const std::string& dir,
                                      const std::vector<std::string>& prompts, int64_t steps,
                                      const EvalOptions& o, const std::string& what, bool unet_int8,
                                      const InferenceOptions& inference) {
  StableDiffusion::LoadOptions load;
  load.unet_int8 = unet_int8;
  ASSIGN_OR_RETURN(StableDiffusion sd, StableDiffusion::Load(dir, load));
  Generated g;
  for (auto* m : std::initializer_list<torch::nn::Module*>{sd.text_encoder.get(), sd.vae.get()}) {
    for (const auto& p : m->parameters()) g.parameters += p.numel();
  }
  g.parameters += quant::UNetParameterCount(*sd.unet);
  g.size_bytes = WeightBytes(dir, unet_int8);
  std::vector<torch::Tensor> images, latents;
  const int64_t n = static_cast<int64_t>(prompts.size());
  const int64_t total = n * o.seeds_per_prompt;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t k = 0; k < o.seeds_per_prompt; ++k) {
    for (int64_t i = 0; i < n; i += o.batch) {
      GenerateOptions go;
      go.prompts.assign(prompts.begin() + i, prompts.begin() + std::min(n, i + o.batch));
      go.steps = steps;
      go.guidance_scale = o.guidance;
      go.scheduler = o.scheduler;
      go.inference = inference;
      // The same call sequence for both models: the same starting noise per image.
      go.seed = static_cast<uint64_t>(o.seed + k * 1000003 + i);
      go.on_final_latents = [&latents](const torch::Tensor& z) { latents.push_back(z.cpu()); };
      ASSIGN_OR_RETURN(torch::Tensor img, Generate(sd, go));
      images.push_back(img);
      if (o.progress) o.progress(what, k * n + std::min(n, i + o.batch), total);
    }
  }
  g.seconds_per_image =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
      static_cast<double>(total);
  g.images = torch::cat(images);
  g.latents = torch::cat(latents);
  return g;
}

nlohmann::json Scores(const Generated& g, ShapeProbe& probe, const torch::Tensor& labels,
                      int64_t seeds, int64_t steps) {
  const auto pred = Predict(probe, g.images.permute({0, 3, 1, 2}) * 2 - 1);
  const auto acc = Accuracy(pred, labels.repeat({seeds, 1}));
  nlohmann::json j;
  for (size_t k = 0; k < kProbeAttributes.size(); ++k) j["accuracy"][kProbeAttributes[k]] = acc[k];
  if (seeds >= 2) {
    // Mean over prompts of mean pairwise (1 - SSIM) between that prompt's seeds.
    const int64_t n = labels.size(0);
    double sum = 0;
    int64_t pairs = 0;
    for (int64_t a = 0; a < seeds; ++a) {
      for (int64_t b = a + 1; b < seeds; ++b) {
        sum +=
            (1 - Ssim(g.images.slice(0, a * n, (a + 1) * n), g.images.slice(0, b * n, (b + 1) * n)))
                .sum()
                .item<double>();
        pairs += n;
      }
    }
    j["diversity"] = sum / static_cast<double>(pairs);
  }
  j["steps"] = steps;
  j["seconds_per_image"] = g.seconds_per_image;
  j["size_bytes"] = g.size_bytes;
  j["parameters"] = g.parameters;
  return j;
}

torch::Tensor Grid(const torch::Tensor& ref, const torch::Tensor& cand, int64_t count) {
  // Rows of four (reference | candidate) pairs with a 2-pixel gutter.
  const int64_t n = std::min<int64_t>(count, cand.size(0)), h = cand.size(1), w = cand.size(2);
  const int64_t per_row = 4, rows = (n + per_row - 1) / per_row, gap = 2;
  auto grid = torch::ones({rows * (h + gap) + gap, per_row * (2 * w + 3 * gap), 3});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = gap + (i / per_row) * (h + gap), x = (i % per_row) * (2 * w + 3 * gap) + gap;
    if (ref.defined()) grid.slice(0, y, y + h).slice(1, x, x + w).copy_(ref[i]);
    grid.slice(0, y, y + h).slice(1, x + w + gap, x + 2 * w + gap).copy_(cand[i]);
  }
  return grid;
}

}  // namespace

absl::StatusOr<EvalResult> Evaluate(const EvalOptions& o) {
  if (o.seeds_per_prompt < 1 || o.count < 1 || o.batch < 1)
    return absl::InvalidArgumentError("count, seeds per prompt and batch must be at least 1");
  ASSIGN_OR_RETURN(ShapeProbe probe, LoadProbe(o.probe));
  ASSIGN_OR_RETURN(LabeledScenes scenes, LoadLabeledScenes(o.prompts, o.count, false));
  const std::vector<std::string>& prompts = scenes.captions;
  const torch::Tensor& label_t = scenes.labels;

  EvalResult r;
  ASSIGN_OR_RETURN(Generated cand, GenerateAll(o.model, prompts, o.steps, o, "model",
                                               o.model_unet_int8, o.inference));
  r.report["model"] = o.model;
  r.report["prompts"] = o.prompts;
  r.report["count"] = prompts.size();
  r.report["seeds_per_prompt"] = o.seeds_per_prompt;
  r.report["guidance"] = o.guidance;
  r.report["scheduler"] = o.scheduler;
  r.report["inference"] = InferenceOptionsJson(o.inference);
  r.report["seed"] = o.seed;
  r.report["candidate"] = Scores(cand, probe, label_t, o.seeds_per_prompt, o.steps);
  torch::Tensor ref_images;
  if (!o.reference.empty()) {
    ASSIGN_OR_RETURN(Generated ref, GenerateAll(o.reference, prompts, o.reference_steps, o,
                                                "reference", false, {}));
    r.report["reference_model"] = o.reference;
    r.report["reference"] = Scores(ref, probe, label_t, o.seeds_per_prompt, o.reference_steps);
    r.report["fidelity"] = {
        {"psnr_db", Psnr(cand.images, ref.images).clamp_max(100).mean().item<double>()},
        {"ssim", Ssim(cand.images, ref.images).mean().item<double>()},
        {"latent_mse", MeanSquaredError(cand.latents, ref.latents).mean().item<double>()}};
    r.report["speedup"] = ref.seconds_per_image / cand.seconds_per_image;
    ref_images = ref.images;
  }
  r.grid = Grid(ref_images, cand.images, 16);
  return r;
}

}  // namespace sd::eval
