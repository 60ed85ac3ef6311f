// sd_probe: runs one C++ component on tensors from a safetensors file and writes
// the result, so the Python tests can compare it with diffusers/transformers.
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "cli/flags/inference_flags.h"
#include "common/args.h"
#include "sd/io/safetensors.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/state_dict.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/quant/unet_int8.h"
#include "sd/schedulers/scheduler.h"
#include "sd/tokenizer/clip_tokenizer.h"
#include "sd/train/denoising_loss.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/stage.h"
#include "worker/data_parallel.h"

namespace {
using sd::safetensors::TensorMap;

absl::StatusOr<torch::Tensor> Need(const TensorMap& m, const std::string& name) {
  auto it = m.find(name);
  if (it == m.end())
    return absl::InvalidArgumentError(absl::StrCat("inputs lack tensor \"", name, "\""));
  return it->second;
}

absl::Status Tokenize(const sd::Args& a) {
  ASSIGN_OR_RETURN(sd::CLIPTokenizer tok, sd::CLIPTokenizer::Load(a.Get("model")));
  ASSIGN_OR_RETURN(std::string text, sd::ReadFile(a.Get("inputs")));
  nlohmann::json prompts = nlohmann::json::parse(text);
  nlohmann::json out = nlohmann::json::array();
  for (const auto& p : prompts)
    out.push_back(tok.EncodePadded(p.get<std::string>(), tok.model_max_length()));
  return sd::WriteFileAtomic(a.Get("out"), out.dump());
}

absl::Status TextEncoder(const sd::Args& a) {
  ASSIGN_OR_RETURN(auto model, sd::LoadCLIPTextModel(a.Get("model")));
  ASSIGN_OR_RETURN(auto in, sd::safetensors::Load(a.Get("inputs")));
  ASSIGN_OR_RETURN(auto ids, Need(in, "input_ids"));
  torch::NoGradGuard g;
  auto r = model->forward(ids.to(torch::kLong), -1, a.Has("attention-maps"));
  TensorMap out{{"last_hidden_state", r.last_hidden_state}, {"pooler_output", r.pooler_output}};
  for (size_t i = 0; i < r.hidden_states.size(); ++i)
    out[absl::StrCat("hidden_states.", i)] = r.hidden_states[i];
  for (size_t i = 0; i < r.attentions.size(); ++i)
    out[absl::StrCat("attentions.", i)] = r.attentions[i];
  return sd::safetensors::Save(a.Get("out"), out);
}

// Wraps an INT8 layer's kernel and keeps what it was given and what it returned,
// so a test can check each layer against the file's format on its own.
class RecordingHook : public sd::LayerHook {
 public:
  RecordingHook(std::shared_ptr<sd::LayerHook> inner, std::string name, TensorMap* out)
      : inner_(std::move(inner)), name_(std::move(name)), out_(out) {}
  torch::Tensor Forward(const torch::Tensor& x,
                        const std::function<torch::Tensor(const torch::Tensor&)>& f) override {
    auto y = inner_->Forward(x, f);
    if (!out_->count("in." + name_)) {
      (*out_)["in." + name_] = x.contiguous().clone();
      (*out_)["out." + name_] = y.contiguous().clone();
    }
    return y;
  }

 private:
  std::shared_ptr<sd::LayerHook> inner_;
  std::string name_;
  TensorMap* out_;
};

absl::Status UNet(const sd::Args& a) {
  // --model DIR: a unet/ folder; --int8 FILE: an INT8 UNet (unet_int8.safetensors).
  ASSIGN_OR_RETURN(auto unet, a.Has("int8") ? sd::quant::LoadUNetInt8(a.Get("int8"))
                                            : sd::LoadUNet(a.Get("model")));
  ASSIGN_OR_RETURN(auto in, sd::safetensors::Load(a.Get("inputs")));
  ASSIGN_OR_RETURN(auto sample, Need(in, "sample"));
  ASSIGN_OR_RETURN(auto t, Need(in, "timestep"));
  ASSIGN_OR_RETURN(auto ctx, Need(in, "encoder_hidden_states"));
  torch::NoGradGuard g;
  unet->recorder().enabled = a.Has("attention-maps");
  if (a.Has("optimized")) {
    unet->set_channels_last(true);
    unet->fuse_qkv_projections(true);
  }
  ASSIGN_OR_RETURN(sd::InferenceOptions inference, sdcli::ParseInferenceFlags(a));
  RETURN_IF_ERROR(sd::ApplyInferenceOptions(*unet, inference, 0, torch::kCPU));
  // "guidance" [B] (w as diffusers' pipelines pass it, guidance_scale - 1): the
  // UNet gets GuidanceScaleEmbedding(w) as its timestep_cond.
  torch::Tensor cond;
  if (in.contains("guidance"))
    cond = sd::GuidanceScaleEmbedding(in.at("guidance"), unet->config().time_cond_proj_dim);
  TensorMap layer_io;
  if (a.Has("layer-io")) {
    for (const auto& l : sd::quant::QuantizableLayers(*unet)) {
      if (l.hook()) l.hook() = std::make_shared<RecordingHook>(l.hook(), l.name, &layer_io);
    }
    for (auto& m : unet->modules(false)) {
      if (auto* attn = m->as<sd::AttentionImpl>())
        attn->fused_hook.reset();  // per layer, not fused
    }
  }
  TensorMap out{{"sample", unet->forward(sample, t, ctx, cond)}};
  out.insert(layer_io.begin(), layer_io.end());
  if (cond.defined()) out["timestep_cond"] = cond;
  for (size_t i = 0; i < unet->recorder().maps.size(); ++i)
    out["attn." + unet->recorder().names[i]] = unet->recorder().maps[i];
  return sd::safetensors::Save(a.Get("out"), out);
}

absl::Status Vae(const sd::Args& a) {
  ASSIGN_OR_RETURN(auto vae, sd::LoadVAE(a.Get("model")));
  ASSIGN_OR_RETURN(auto in, sd::safetensors::Load(a.Get("inputs")));
  ASSIGN_OR_RETURN(auto images, Need(in, "images"));
  ASSIGN_OR_RETURN(auto latents, Need(in, "latents"));
  torch::NoGradGuard g;
  if (a.Has("optimized")) vae->set_channels_last(true);
  const bool tiled = a.Has("vae-tiling");
  auto post = tiled ? vae->encode_tiled(images) : vae->encode(images);
  return sd::safetensors::Save(
      a.Get("out"), {{"mean", post.mean},
                     {"logvar", post.logvar},
                     {"decoded", tiled ? vae->decode_tiled(latents) : vae->decode(latents)}});
}

absl::Status TrainStep(const sd::Args& a) {
  ASSIGN_OR_RETURN(auto unet, sd::LoadUNet(a.Get("model")));
  ASSIGN_OR_RETURN(auto json, sd::JsonConfig::Load(a.Get("scheduler-config")));
  ASSIGN_OR_RETURN(auto scheduler, sd::MakeScheduler("ddim", json));
  ASSIGN_OR_RETURN(auto in, sd::safetensors::Load(a.Get("inputs")));
  ASSIGN_OR_RETURN(auto latents, Need(in, "latents"));
  ASSIGN_OR_RETURN(auto noise, Need(in, "noise"));
  ASSIGN_OR_RETURN(auto t, Need(in, "timesteps"));
  ASSIGN_OR_RETURN(auto ctx, Need(in, "encoder_hidden_states"));
  ASSIGN_OR_RETURN(double lr, a.Double("lr", 1e-3));
  ASSIGN_OR_RETURN(int64_t steps, a.Int("steps", 1));
  unet->train();
  // Parameters alias the copy-on-write checkpoint mapping: training in place is safe.
  torch::optim::AdamW opt(unet->parameters(), torch::optim::AdamWOptions(lr).weight_decay(1e-2));
  double loss_value = 0;
  sd::safetensors::TensorMap grads;
  for (int64_t s = 0; s < steps; ++s) {
    opt.zero_grad();
    auto loss = sd::DenoisingLoss(unet, *scheduler, latents, noise, t.to(torch::kLong), ctx);
    loss.backward();
    // The last step's gradients, so the test can check them and the optimizer apart.
    grads.clear();
    for (const auto& p : unet->named_parameters())
      if (p.value().grad().defined()) grads["__grad__." + p.key()] = p.value().grad().clone();
    opt.step();
    loss_value = loss.item<double>();
  }
  auto out = sd::StateDict(*unet);
  out.insert(grads.begin(), grads.end());
  out["__loss__"] = torch::tensor(loss_value);
  return sd::safetensors::Save(a.Get("out"), out);
}

// One AdamW step on the text encoder: loss = mean((last_hidden_state - target)^2).
absl::Status TrainTextEncoder(const sd::Args& a) {
  ASSIGN_OR_RETURN(auto model, sd::LoadCLIPTextModel(a.Get("model")));
  ASSIGN_OR_RETURN(auto in, sd::safetensors::Load(a.Get("inputs")));
  ASSIGN_OR_RETURN(auto ids, Need(in, "input_ids"));
  ASSIGN_OR_RETURN(auto target, Need(in, "target"));
  ASSIGN_OR_RETURN(double lr, a.Double("lr", 1e-4));
  model->train();
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(lr).weight_decay(1e-2));
  opt.zero_grad();
  auto loss = torch::mse_loss(model->forward(ids.to(torch::kLong)).last_hidden_state, target);
  loss.backward();
  opt.step();
  auto out = sd::StateDict(*model);
  out["__loss__"] = torch::tensor(loss.item<double>());
  return sd::safetensors::Save(a.Get("out"), out);
}

// Runs one stage of a job in this process (rank 0 of 1), optionally stopping
// before a given step to simulate a crash.
absl::Status RunStage(const sd::Args& a) {
  ASSIGN_OR_RETURN(sd::JobSpec job, sd::LoadJobSpec(a.Get("job")));
  sd::TaskAssignment task;
  // The job's stage when it names one, else --stage.
  task.stage = a.Get("stage", job.stages.size() == 1 ? job.stages[0].name : "finetune");
  task.checkpoint_dir = a.Get("checkpoint-dir");
  task.output_dir = a.Get("out");
  // Beside the output, as a job's folder has it.
  task.artifacts_dir =
      a.Get("artifacts-dir",
            (std::filesystem::path(task.output_dir).parent_path() / "artifacts").string());
  task.input_model = a.Get("model", job.model);
  task.rendezvous = a.Get("rendezvous");
  ASSIGN_OR_RETURN(task.rank, a.Int("rank", 0));
  ASSIGN_OR_RETURN(task.world_size, a.Int("world-size", 1));
  ASSIGN_OR_RETURN(int64_t stop_at, a.Int("stop-at", -1));
  ASSIGN_OR_RETURN(auto stage, sd::stages::MakeStage(task.stage));
  sd::stages::StageContext ctx = sd::stages::MakeStageContext(task, std::move(job));
  ctx.device = torch::Device(a.Get("device", "cpu"));
  if (ctx.world_size > 1) {
    ASSIGN_OR_RETURN(ctx.collectives, sd::worker::DataParallelGroup::Join(task.rendezvous, ctx.rank,
                                                                          ctx.world_size));
  }
  ctx.should_stop = [stop_at](int64_t step) { return step == stop_at; };
  ctx.event = [](sd::stages::StageEvent, const std::string& text) {
    std::cout << "event: " << text << std::endl;
  };
  ctx.report = [](const sd::stages::StageProgress& p) {
    std::cout << "step " << p.step << "/" << p.total_steps << " loss " << p.loss
              << (p.checkpointed ? " ckpt" : "") << std::endl;
  };
  return stage->Run(ctx);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: sd_probe tokenize|text-encoder|unet|vae|train-step --model DIR --inputs "
                 "FILE --out FILE\n";
    return 2;
  }
  const std::string cmd = argv[1];
  auto args = sd::Args::Parse(
      argc - 2, argv + 2,
      sdcli::Concat({"model", "inputs", "out", "lr", "steps", "scheduler-config", "threads", "job",
                     "stage", "checkpoint-dir", "artifacts-dir", "stop-at", "rank", "world-size",
                     "rendezvous", "device", "int8"},
                    sdcli::InferenceValueFlags()),
      {}, sdcli::Concat({"attention-maps", "optimized", "layer-io"}, sdcli::InferenceSwitches()));
  if (!args.ok()) {
    std::cerr << args.status().message() << "\n";
    return 2;
  }
  if (args->Has("threads")) torch::set_num_threads(std::stoi(args->Get("threads")));
  absl::Status s;
  if (cmd == "tokenize")
    s = Tokenize(*args);
  else if (cmd == "text-encoder")
    s = TextEncoder(*args);
  else if (cmd == "unet")
    s = UNet(*args);
  else if (cmd == "vae")
    s = Vae(*args);
  else if (cmd == "train-step")
    s = TrainStep(*args);
  else if (cmd == "train-text-encoder")
    s = TrainTextEncoder(*args);
  else if (cmd == "stage")
    s = RunStage(*args);
  else
    s = absl::InvalidArgumentError("unknown command " + cmd);
  if (!s.ok()) {
    std::cerr << "sd_probe " << cmd << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}
