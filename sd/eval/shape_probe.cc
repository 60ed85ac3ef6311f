#include "sd/eval/shape_probe.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "sd/data/dataset.h"
#include "sd/data/synth_shapes.h"
#include "sd/models/state_dict.h"
#include "sd/util/status_macros.h"

namespace sd::eval {
namespace nn = torch::nn;
namespace {

void AddConvBlock(nn::Sequential& s, int64_t in, int64_t out) {
  s->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1)));
  s->push_back(nn::BatchNorm2d(out));
  s->push_back(nn::ReLU());
  s->push_back(nn::MaxPool2d(2));
}

int64_t IndexOf(const std::vector<std::string>& names, const nlohmann::json& v) {
  if (!v.is_string()) return -1;
  const auto it = std::find(names.begin(), names.end(), v.get<std::string>());
  return it == names.end() ? -1 : it - names.begin();
}

}  // namespace

ShapeProbeImpl::ShapeProbeImpl() {
  nn::Sequential f;
  const int64_t widths[] = {3, 24, 48, 64, 64};
  for (int i = 0; i < 4; ++i) AddConvBlock(f, widths[i], widths[i + 1]);
  features = register_module("features", f);
  hidden = register_module("hidden", nn::Linear(64 * 4 * 4, 128));
  shape = register_module("shape", nn::Linear(128, synth::ShapeNames().size()));
  color = register_module("color", nn::Linear(128, synth::ColorNames().size()));
  position = register_module("position", nn::Linear(128, synth::PositionNames().size()));
  background = register_module("background", nn::Linear(128, synth::BackgroundNames().size()));
}

std::array<torch::Tensor, 4> ShapeProbeImpl::forward(torch::Tensor x) {
  if (x.size(2) != 64 || x.size(3) != 64) {
    x = nn::functional::interpolate(x, nn::functional::InterpolateFuncOptions()
                                           .size(std::vector<int64_t>{64, 64})
                                           .mode(torch::kBilinear)
                                           .align_corners(false)
                                           .antialias(true));
  }
  auto h = torch::relu(hidden(features->forward(x).flatten(1)));
  return {shape(h), color(h), position(h), background(h)};
}

absl::StatusOr<std::array<int64_t, 4>> ProbeLabels(const nlohmann::json& meta) {
  if (!meta.is_object() || !meta.contains("objects") || !meta["objects"].is_array() ||
      meta["objects"].size() != 1)
    return absl::NotFoundError("not a single-shape scene");
  const auto& o = meta["objects"][0];
  std::array<int64_t, 4> l = {
      IndexOf(synth::ShapeNames(), o.value("shape", nlohmann::json())),
      IndexOf(synth::ColorNames(), o.value("color", nlohmann::json())),
      IndexOf(synth::PositionNames(), o.value("position", nlohmann::json())),
      IndexOf(synth::BackgroundNames(), meta.value("background", nlohmann::json()))};
  for (size_t i = 0; i < l.size(); ++i) {
    if (l[i] < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("scene metadata has no known ", kProbeAttributes[i], ": ", meta.dump()));
  }
  return l;
}

torch::Tensor Predict(ShapeProbe& probe, const torch::Tensor& images) {
  torch::NoGradGuard ng;
  probe->eval();
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < images.size(0); i += 256) {
    auto logits = probe->forward(images.slice(0, i, std::min(i + 256, images.size(0))));
    std::vector<torch::Tensor> cols;
    for (auto& l : logits) cols.push_back(l.argmax(1));
    out.push_back(torch::stack(cols, 1));
  }
  return torch::cat(out);
}

std::array<double, 4> Accuracy(const torch::Tensor& predicted, const torch::Tensor& labels) {
  std::array<double, 4> acc{};
  for (int64_t k = 0; k < 4; ++k)
    acc[k] =
        predicted.select(1, k).eq(labels.select(1, k)).to(torch::kFloat64).mean().item<double>();
  return acc;
}

absl::StatusOr<LabeledScenes> LoadLabeledScenes(const std::string& dataset, int64_t max_count,
                                                bool with_images) {
  ASSIGN_OR_RETURN(std::shared_ptr<const CaptionedSource> source, OpenDataset(dataset));
  LabeledScenes s;
  std::vector<torch::Tensor> labels, images;
  for (size_t i = 0; i < source->size() && static_cast<int64_t>(labels.size()) < max_count; ++i) {
    auto raw = source->Read(i);
    if (!raw.ok()) continue;
    auto l = ProbeLabels(raw->meta);
    if (!l.ok()) continue;  // two-shape scenes have no single label
    if (with_images) {
      auto gen = SampleGenerator(0, 0, static_cast<int64_t>(i));
      auto item = Transform(*raw, TransformOptions{}, gen);
      if (!item.ok()) continue;
      images.push_back(item->pixels);
    }
    s.captions.push_back(raw->caption);
    labels.push_back(torch::tensor(std::vector<int64_t>(l->begin(), l->end())));
  }
  if (labels.empty())
    return absl::InvalidArgumentError(
        absl::StrCat(dataset, ": no single-shape scenes with labeled metadata"));
  s.labels = torch::stack(labels);
  if (with_images) s.images = torch::stack(images);
  return s;
}

absl::StatusOr<ShapeProbe> TrainProbe(const std::string& dataset, const ProbeTrainOptions& o,
                                      const std::function<void(int64_t, double)>& progress) {
  ASSIGN_OR_RETURN(std::shared_ptr<const CaptionedSource> source, OpenDataset(dataset));
  torch::manual_seed(static_cast<uint64_t>(o.seed));
  ShapeProbe probe;
  probe->train();
  torch::optim::AdamW opt(probe->parameters(), torch::optim::AdamWOptions(o.lr).weight_decay(1e-4));
  LoaderOptions lo;
  lo.transform.resolution = 64;
  lo.local_batch = o.batch_size;
  lo.seed = o.seed;
  DataLoader loader(source, lo, 0);
  for (int64_t step = 0; step < o.steps; ++step) {
    ASSIGN_OR_RETURN(Batch b, loader.Next());
    std::vector<int64_t> keep;
    std::vector<torch::Tensor> labels;
    for (size_t i = 0; i < b.meta.size(); ++i) {
      auto l = ProbeLabels(b.meta[i]);
      if (!l.ok()) continue;
      keep.push_back(static_cast<int64_t>(i));
      labels.push_back(torch::tensor(std::vector<int64_t>(l->begin(), l->end())));
    }
    if (keep.size() < 2) continue;
    auto x = b.pixels.index_select(0, torch::tensor(keep));
    // Generated images are noisier and softer than rendered ones (a 4x VAE
    // cannot keep every edge): train on clean, blurred, half-resolution and
    // noisy versions so the probe judges what is drawn, not how sharply.
    auto gen = SampleGenerator(o.seed ^ 0x9B0BE, step, 0);
    const double r = torch::rand({1}, gen).item<double>();
    if (r < 0.25) {
      x = nn::functional::avg_pool2d(x,
                                     nn::functional::AvgPool2dFuncOptions(3).stride(1).padding(1));
    } else if (r < 0.5) {
      const int64_t side = x.size(2);
      auto opts =
          nn::functional::InterpolateFuncOptions().mode(torch::kBilinear).align_corners(false);
      x = nn::functional::interpolate(
          nn::functional::interpolate(
              x, opts.size(std::vector<int64_t>{side / 2, side / 2}).antialias(true)),
          opts.size(std::vector<int64_t>{side, side}).antialias(false));
    }
    x = x + torch::randn(x.sizes(), gen) * 0.1 * torch::rand({x.size(0), 1, 1, 1}, gen);
    const auto y = torch::stack(labels);
    const double lr = o.lr * 0.5 * (1 + std::cos(3.14159265358979 * step / o.steps));
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    auto logits = probe->forward(x);
    torch::Tensor loss = torch::zeros({});
    for (int k = 0; k < 4; ++k) loss = loss + torch::cross_entropy_loss(logits[k], y.select(1, k));
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (progress) progress(step + 1, loss.item<double>());
  }
  probe->eval();
  return probe;
}

absl::Status SaveProbe(ShapeProbe& probe, const std::string& path) {
  return safetensors::Save(path, StateDict(*probe));
}

absl::StatusOr<ShapeProbe> LoadProbe(const std::string& path) {
  ShapeProbe probe;
  ASSIGN_OR_RETURN(auto ckpt, safetensors::Checkpoint::Open(path));
  RETURN_IF_ERROR(LoadStateDict(*probe, ckpt, path, LoadOptions{.copy = true}));
  probe->eval();
  return probe;
}

}  // namespace sd::eval
