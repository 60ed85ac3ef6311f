// Times the C++ core: `unet` (one forward, as in one CFG step), `unet-train`
// (forward + backward of an MSE loss, as in one training step without the
// optimizer), `t2i` (text encoder + N UNet steps + VAE decode) or `text-encoder`
// (one CLIP forward of a padded batch; its parameter count too). Prints one JSON line;
// bench/run_bench.py runs it beside the diffusers reference in the same run.
#include <ATen/CPUGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <fstream>

#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>

#include "cli/flags/inference_flags.h"
#include "common/args.h"
#include "sd/io/safetensors.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/pipeline/cuda_graph.h"
#include "sd/pipeline/stable_diffusion.h"
#include "sd/quant/calibration.h"
#include "sd/util/status_macros.h"

namespace {

// VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a child would
// report its parent's peak.
double StatusMb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) / 1024.0;
  }
  return -1;
}
double PeakRssMb() { return StatusMb("VmHWM:"); }

void Sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

absl::Status Run(int argc, char** argv) {
  if (argc < 2)
    return absl::InvalidArgumentError(
        "usage: bench_sd unet|unet-train|unet-load|t2i|text-encoder|vae-decode --model DIR "
        "[flags]");
  const std::string mode = argv[1];
  ASSIGN_OR_RETURN(sd::Args a, sd::Args::Parse(argc - 2, argv + 2,
                                               sdcli::Concat({"model",
                                                              "batch",
                                                              "size",
                                                              "iters",
                                                              "warmup",
                                                              "threads",
                                                              "dtype",
                                                              "device",
                                                              "steps",
                                                              "height",
                                                              "width",
                                                              "channels-last",
                                                              "clone",
                                                              "fuse",
                                                              "profile",
                                                              "int8",
                                                              "calibration-inputs",
                                                              "clipping",
                                                              "float",
                                                              "int8-convolutions",
                                                              "layer-sqnr",
                                                              "io",
                                                              "save-output",
                                                              "copy"},
                                                             sdcli::InferenceValueFlags()),
                                               {}, sdcli::InferenceSwitches()));
  ASSIGN_OR_RETURN(sd::InferenceOptions inference, sdcli::ParseInferenceFlags(a));
  ASSIGN_OR_RETURN(int64_t threads, a.Int("threads", 0));
  if (threads > 0) {
    torch::set_num_threads(static_cast<int>(threads));
  }
  ASSIGN_OR_RETURN(int64_t iters, a.Int("iters", 3));
  ASSIGN_OR_RETURN(int64_t warmup, a.Int("warmup", 1));
  ASSIGN_OR_RETURN(torch::Dtype dtype, sd::ParseDtypeName(a.Get("dtype", "fp32")));
  torch::Device device(a.Get("device", "cpu"));
  nlohmann::json out = {{"mode", mode},
                        {"threads", torch::get_num_threads()},
                        {"dtype", a.Get("dtype", "fp32")},
                        {"device", device.str()}};
  std::vector<double> times;
  auto measure = [&](const std::function<void()>& fn) {
    for (int64_t i = 0; i < warmup + iters; ++i) {
      Sync(device);
      auto t0 = std::chrono::steady_clock::now();
      fn();
      Sync(device);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i >= warmup) times.push_back(s);
    }
  };
  if (mode == "unet" || mode == "unet-train") {
    const bool train = mode == "unet-train";
    ASSIGN_OR_RETURN(auto unet, sd::LoadUNet(a.Get("model"), /*copy_weights=*/true));
    unet->to(device, dtype);
    if (a.Get("clone", "0") == "1") {
      torch::NoGradGuard ng;
      for (auto& p : unet->parameters()) p.set_data(p.data().clone());
    }
    // Training runs as the finetune stage does: plain layout, unfused projections.
    if (a.Get("channels-last", train ? "0" : "1") == "1") unet->set_channels_last(true);
    if (a.Get("fuse", train ? "0" : "1") == "1") unet->fuse_qkv_projections(true);
    RETURN_IF_ERROR(sd::ApplyInferenceOptions(*unet, inference, 0, device));
    out["inference"] = sd::InferenceOptionsJson(inference);
    unet->train(train);
    ASSIGN_OR_RETURN(int64_t batch, a.Int("batch", 2));
    ASSIGN_OR_RETURN(int64_t size, a.Int("size", 64));
    auto opts = torch::TensorOptions().dtype(dtype).device(device);
    auto sample = torch::randn({batch, unet->config().in_channels, size, size}, opts);
    auto ctx = torch::randn({batch, 77, unet->config().cross_attention_dim}, opts);
    auto t = torch::tensor(500, torch::TensorOptions().device(device));
    if (a.Has("io")) {  // fixed inputs, so the Python side can compare outputs
      ASSIGN_OR_RETURN(auto io, sd::safetensors::Load(a.Get("io"), torch::kFloat32));
      sample = io.at("sample").to(opts).contiguous();
      ctx = io.at("encoder_hidden_states").to(opts);
      t = io.at("timestep").to(device);
    }
    if (a.Get("int8", "0") == "1") {
      // Calibrated on forwards of the benchmark's own input distribution (random
      // weights have no real data), at several timesteps, through the library's
      // observers and clipping; then the same kernels the INT8 loader installs.
      ASSIGN_OR_RETURN(int64_t n_calib, a.Int("calibration-inputs", 4));
      const std::string clipping = a.Get("clipping", "mse");
      const bool convs = a.Get("int8-convolutions", "1") != "0";
      const auto observed = sd::quant::ObserveConvolutions(*unet, 0, convs);
      {
        torch::InferenceMode g;
        auto gen = at::detail::createCPUGenerator(1234);
        for (int64_t i = 0; i < n_calib; ++i) {
          auto x = torch::randn(sample.sizes(), gen).to(opts);
          auto c = torch::randn(ctx.sizes(), gen).to(opts);
          unet->forward(x, torch::tensor(999 - i * 999 / std::max<int64_t>(1, n_calib - 1)), c);
        }
      }
      sd::quant::ClearHooks(*unet);
      ASSIGN_OR_RETURN(sd::quant::Int8Plan plan,
                       sd::quant::PlanFromObservation(observed, clipping));
      if (a.Has("float")) {  // a sensitivity experiment: these layers stay float
        const std::regex keep(a.Get("float"));
        for (const auto& l : sd::quant::QuantizableLayers(*unet)) {
          if (!std::regex_search(l.name, keep) || plan.float_layers.count(l.name)) continue;
          plan.float_layers[l.name] = "--float";
          plan.conv_inputs.erase(l.name);
          std::erase(plan.linears, l.name);
        }
      }
      if (a.Get("layer-sqnr", "0") == "1") {
        // Each INT8 layer's own error on the measured input, the float model's
        // trajectory throughout (the probe calibration uses, on this input).
        ASSIGN_OR_RETURN(const auto probes, sd::quant::InstallSqnrProbes(*unet, plan));
        {
          torch::InferenceMode g;
          unet->forward(sample, t, ctx);
        }
        sd::quant::ClearHooks(*unet);
        std::vector<std::pair<double, std::string>> by_db;
        by_db.reserve(probes.size());
        for (const auto& [name, p] : probes) by_db.emplace_back(p->sqnr_db(), name);
        std::sort(by_db.begin(), by_db.end());
        nlohmann::json sq = nlohmann::json::array();
        for (const auto& [db, name] : by_db) sq.push_back({name, std::round(db * 100) / 100});
        out["layer_sqnr_db"] = sq;
      }
      RETURN_IF_ERROR(sd::quant::ApplyInt8(*unet, plan, /*release_float_weights=*/true));
      out["int8_convolutions"] = plan.conv_inputs.size();
      out["int8_linears"] = plan.linears.size();
      out["float_layers"] = plan.float_layers.size();
      out["clipping"] = clipping;
    }
    auto target = torch::randn_like(sample);
    std::optional<torch::InferenceMode> guard;
    if (!train) guard.emplace();
    // --cuda-graphs: the step as Generate runs it, captured once and replayed.
    std::optional<sd::UNetGraph> graph;
    if (inference.cuda_graphs && !train) graph.emplace(unet);
    auto step = [&] {
      auto y = graph ? graph->Forward(sample, t, ctx) : unet->forward(sample, t, ctx);
      if (!train) return;
      torch::mse_loss(y, target).backward();
      for (auto& p : unet->parameters()) p.mutable_grad() = torch::Tensor();
    };
    if (a.Has("save-output")) {
      torch::InferenceMode g;
      RETURN_IF_ERROR(sd::safetensors::Save(
          a.Get("save-output"),
          {{"out", unet->forward(sample, t, ctx).to(torch::kFloat32).cpu()}}));
    }
    if (a.Has("profile")) {
      step();
      torch::autograd::profiler::RecordProfile prof(a.Get("profile"));
      step();
    }
    measure(step);
    if (graph) {
      out["cuda_graph_replayed"] = graph->replayed();
      out["cuda_graph_captures"] = graph->captures();
    }
  } else if (mode == "unet-load") {
    // What loading costs in memory: the peak over the RSS before, one load of the
    // folder (one file or a sharded index), every weight touched after it.
    ASSIGN_OR_RETURN(const int64_t copy, a.Int("copy", 1));
    out["rss_before_mb"] = StatusMb("VmRSS:");
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(auto unet, sd::LoadUNet(a.Get("model"), /*copy_weights=*/copy == 1));
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    double sum = 0;
    int64_t bytes = 0;
    for (const auto& p : unet->parameters()) {
      sum += p.sum().item<double>();
      bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
    out["checksum"] = sum;
    out["weight_mb"] = static_cast<double>(bytes) / (1 << 20);
    out["rss_after_mb"] = StatusMb("VmRSS:");
    out["copy"] = copy == 1;
  } else if (mode == "t2i") {
    ASSIGN_OR_RETURN(sd::StableDiffusion model,
                     sd::StableDiffusion::Load(a.Get("model"), device, dtype));
    sd::GenerateOptions o;
    o.prompts = {"a photograph of an astronaut riding a horse"};
    ASSIGN_OR_RETURN(o.steps, a.Int("steps", 4));
    ASSIGN_OR_RETURN(o.height, a.Int("height", 512));
    ASSIGN_OR_RETURN(o.width, a.Int("width", 512));
    o.scheduler = "ddim";
    o.inference = inference;
    out["inference"] = sd::InferenceOptionsJson(inference);
    absl::Status failed;
    measure([&] {
      if (auto images = sd::Generate(model, o); !images.ok()) failed = images.status();
    });
    RETURN_IF_ERROR(failed);
  } else if (mode == "text-encoder") {
    // --model is a text_encoder folder: one forward of `batch` padded prompts.
    ASSIGN_OR_RETURN(auto te, sd::LoadCLIPTextModel(a.Get("model"), /*copy_weights=*/true));
    te->to(device, dtype);
    ASSIGN_OR_RETURN(int64_t batch, a.Int("batch", 2));
    const int64_t n = te->config().max_position_embeddings;
    auto ids = torch::randint(0, te->config().vocab_size - 2, {batch, n},
                              torch::TensorOptions().dtype(torch::kLong).device(device));
    int64_t params = 0;
    for (const auto& p : te->parameters()) params += p.numel();
    out["parameters"] = params;
    out["layers"] = te->config().num_hidden_layers;
    torch::InferenceMode guard;
    measure([&] { te->forward(ids); });
  } else if (mode == "vae-decode") {
    // --model is a vae folder: one decode of `batch` latents of --size (64: 512 px).
    ASSIGN_OR_RETURN(auto vae, sd::LoadVAE(a.Get("model"), /*copy_weights=*/true));
    vae->to(device, dtype);
    if (a.Get("channels-last", "1") == "1") vae->set_channels_last(true);
    ASSIGN_OR_RETURN(int64_t batch, a.Int("batch", 1));
    ASSIGN_OR_RETURN(int64_t size, a.Int("size", 64));
    auto z = torch::randn({batch, vae->config().latent_channels, size, size},
                          torch::TensorOptions().dtype(dtype).device(device));
    int64_t params = 0;
    for (const auto& p : vae->decoder->parameters()) params += p.numel();
    out["decoder_parameters"] = params;
    out["inference"] = sd::InferenceOptionsJson(inference);
    // What the decode adds is the peak minus this (weights and latents are loaded).
    out["rss_before_mb"] = StatusMb("VmRSS:");
    torch::InferenceMode guard;
    measure([&] { sd::DecodeLatents(*vae, z, inference); });
  } else {
    return absl::InvalidArgumentError(
        "mode must be unet, unet-train, unet-load, t2i, text-encoder or vae-decode");
  }
  out["times_s"] = times;
  out["median_s"] = Median(times);
  out["peak_rss_mb"] = PeakRssMb();
  if (device.is_cuda()) {
    auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    out["peak_gpu_mb"] = static_cast<double>(stats.allocated_bytes[0].peak) / (1 << 20);
  }
  std::cout << out.dump() << std::endl;
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::Status s;
  try {
    s = Run(argc, argv);
  } catch (const std::exception& e) {
    s = absl::InternalError(e.what());
  }
  if (!s.ok()) {
    std::cerr << "bench_sd: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
