#include "serve/engine.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>

#include "absl/strings/str_cat.h"
#include "sd/image/png_image.h"
#include "sd/schedulers/scheduler.h"
#include "sd/util/status_macros.h"

namespace sd::serve {
namespace {

// CLIP reads 77 tokens: a start token, 75 of the prompt, an end token.
constexpr int64_t kMaxPromptTokens = 75;

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const std::vector<double>& BatchBuckets() {
  static const std::vector<double> b = {1, 2, 4, 8, 16, 32, 64};
  return b;
}
const std::vector<double>& LatencyBuckets() {
  static const std::vector<double> b = {0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320};
  return b;
}

}  // namespace

// ---- Engine ----

struct Engine::Active {
  uint64_t id = 0;
  std::shared_ptr<Job> job;
  std::unique_ptr<Scheduler> scheduler;
  torch::Tensor latents;        // [n, C, h, w], scaled by init_noise_sigma
  torch::Tensor context;        // [rows, 77, D]: the unconditional rows first with CFG
  torch::Tensor timestep_cond;  // [n, time_cond_proj_dim] for a CFG-distilled UNet
  bool cfg = false;
  double guidance = 7.5;
  size_t step = 0;
  int64_t n = 1, height = 0, width = 0, steps = 0;
  double arrival = 0, deadline = 0;
};

Engine::Engine(StableDiffusion model, EngineOptions o, metrics::Registry* registry)
    : sd_(std::move(model)), o_(std::move(o)), registry_(registry), batcher_(o_.batcher) {
  default_side_ = sd_.unet->config().sample_size * sd_.vae_scale_factor();
  guidance_dim_ = sd_.unet->config().time_cond_proj_dim;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Start(StableDiffusion model, EngineOptions o,
                                                      metrics::Registry* registry) {
  RETURN_IF_ERROR(ValidateBatcherOptions(o.batcher));
  if (!model.unet || !model.vae || !model.text_encoder)
    return absl::InvalidArgumentError("the server needs the text encoder, UNet and VAE loaded");
  if (o.default_steps < 1 || o.default_steps > o.max_steps)
    return absl::InvalidArgumentError(absl::StrCat(
        "default steps ", o.default_steps, " must be in [1, --max-steps ", o.max_steps, "]"));
  {
    auto scheduler = MakeScheduler("default", model.scheduler_config);
    if (!scheduler.ok()) return scheduler.status();
    const int64_t train_steps = (*scheduler)->config().num_train_timesteps;
    if (o.max_steps > train_steps)
      return absl::InvalidArgumentError(absl::StrCat("--max-steps ", o.max_steps,
                                                     " exceeds the scheduler's ", train_steps,
                                                     " training timesteps"));
  }
  if (!(o.request_timeout_s > 0))
    return absl::InvalidArgumentError(
        absl::StrCat("--request-timeout must be > 0 seconds, got ", o.request_timeout_s));
  // The options stay on for the server's life: one token-merging stream, one
  // attention kernel for everybody.
  RETURN_IF_ERROR(ApplyInferenceOptions(*model.unet, o.inference, o.seed, model.device));
  SetSdpaBackend(*model.text_encoder, o.inference.sdpa);
  std::unique_ptr<Engine> e(new Engine(std::move(model), std::move(o), registry));
  e->thread_ = std::thread([p = e.get()] { p->Loop(); });
  return e;
}

Engine::~Engine() { Shutdown(); }

void Engine::Shutdown() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

absl::Status Engine::Validate(GenerationRequest& r) const {
  if (r.prompt.empty()) return FieldError("prompt", "required, and must not be empty");
  const auto check_tokens = [&](const std::string& field, const std::string& text) {
    const int64_t tokens = static_cast<int64_t>(sd_.tokenizer.Encode(text).size());
    if (tokens > kMaxPromptTokens)
      return FieldError(
          field, absl::StrCat(tokens, " tokens; the text encoder reads at most ", kMaxPromptTokens,
                              " (CLIP's 77 with start and end): shorten it"));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check_tokens("prompt", r.prompt));
  RETURN_IF_ERROR(check_tokens("negative_prompt", r.negative_prompt));
  if (guidance_dim_ > 0 && !r.negative_prompt.empty())
    return FieldError("negative_prompt",
                      "this model is CFG-distilled (guidance is one UNet pass with the scale as "
                      "input): there is no unconditional pass for a negative prompt");
  if (r.n < 1 || r.n > o_.batcher.max_batch_size)
    return FieldError("n", absl::StrCat("must be in [1, ", o_.batcher.max_batch_size,
                                        "] (the server's --max-batch-size), got ", r.n));
  if (r.width == 0) r.width = default_side_;
  if (r.height == 0) r.height = default_side_;
  if (r.width % 8 != 0 || r.height % 8 != 0 || r.width < 8 || r.height < 8 ||
      r.width > o_.max_side || r.height > o_.max_side)
    return FieldError("size", absl::StrCat("width and height must be multiples of 8 in [8, ",
                                           o_.max_side, "], got ", r.width, "x", r.height));
  if (r.steps == 0) r.steps = o_.default_steps;
  if (r.steps < 1 || r.steps > o_.max_steps)
    return FieldError("steps", absl::StrCat("must be in [1, ", o_.max_steps,
                                            "] (the server's --max-steps), got ", r.steps));
  if (!r.guidance_scale) r.guidance_scale = 7.5;
  if (!std::isfinite(*r.guidance_scale) || *r.guidance_scale < 0 || *r.guidance_scale > 100)
    return FieldError("guidance_scale",
                      absl::StrCat("must be in [0, 100], got ", *r.guidance_scale));
  const std::string scheduler = r.scheduler.empty() ? "default" : r.scheduler;
  if (auto s = MakeScheduler(scheduler, sd_.scheduler_config); !s.ok())
    return FieldError("scheduler", std::string(s.status().message()));
  if (r.timeout_s == 0) r.timeout_s = o_.request_timeout_s;
  if (!(r.timeout_s > 0) || r.timeout_s > 86400)
    return FieldError("timeout", absl::StrCat("must be in (0, 86400] seconds, got ", r.timeout_s));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Job>> Engine::Submit(GenerationRequest r) {
  if (absl::Status s = Validate(r); !s.ok()) {
    registry_->CounterAdd("sdserve_rejected_requests_total",
                          "Requests refused before they queued, by reason",
                          {{"reason", "invalid"}});
    return s;
  }
  auto job = std::make_shared<Job>(std::move(r));
  const GenerationRequest& q = job->request();
  const double now = Now();
  {
    std::lock_guard l(mu_);
    if (stop_) return absl::UnavailableError("the server is shutting down");
    const uint64_t id = next_id_++;
    QueuedRequest qr;
    qr.id = id;
    qr.images = q.n;
    qr.height = q.height;
    qr.width = q.width;
    qr.steps = q.steps;
    qr.arrival = now;
    qr.deadline = now + q.timeout_s;
    if (absl::Status s = batcher_.Enqueue(qr); !s.ok()) {
      registry_->CounterAdd(
          "sdserve_rejected_requests_total", "Requests refused before they queued, by reason",
          {{"reason",
            s.code() == absl::StatusCode::kResourceExhausted ? "queue_full" : "invalid"}});
      return s;
    }
    pending_[id] = job;
    arrival_[id] = now;
    registry_->GaugeSet("sdserve_queue_depth", "Requests waiting to start", {},
                        static_cast<double>(batcher_.depth()));
  }
  cv_.notify_all();
  return job;
}

int64_t Engine::retry_after_s() {
  std::lock_guard l(mu_);
  const double ahead = static_cast<double>(batcher_.queued_images() + running_images_);
  if (images_per_s_ <= 0) return 1;
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(ahead / images_per_s_)), 1, 600);
}

ServiceHealth Engine::health() {
  std::lock_guard l(mu_);
  return {!stop_, batcher_.depth(), running_images_};
}

void Engine::Loop() {
  // Completed images per second over the last minute, for Retry-After.
  std::deque<std::pair<double, int64_t>> finished;
  for (;;) {
    std::vector<std::pair<std::shared_ptr<Job>, absl::Status>> dropped;
    std::vector<std::shared_ptr<Job>> joining;
    std::vector<double> joining_arrival;
    double now = Now();
    {
      std::unique_lock l(mu_);
      if (stop_) break;
      for (auto it = pending_.begin(); it != pending_.end();) {
        if (it->second->cancelled()) {
          batcher_.Remove(it->first);
          dropped.emplace_back(it->second, absl::CancelledError("cancelled before it started"));
          arrival_.erase(it->first);
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
      for (uint64_t id : batcher_.TakeExpired(now)) {
        dropped.emplace_back(pending_[id],
                             absl::DeadlineExceededError("the deadline passed while queued"));
        pending_.erase(id);
        arrival_.erase(id);
      }
      RunningBatch rb;
      for (const auto& a : active_) rb.images += a->n;
      if (!active_.empty()) {
        rb.height = active_.front()->height;
        rb.width = active_.front()->width;
        rb.steps = active_.front()->steps;
      }
      Admission adm = batcher_.Admit(now, rb);
      for (uint64_t id : adm.admit) {
        joining.push_back(pending_[id]);
        joining_arrival.push_back(arrival_[id]);
        pending_.erase(id);
        arrival_.erase(id);
      }
      registry_->GaugeSet("sdserve_queue_depth", "Requests waiting to start", {},
                          static_cast<double>(batcher_.depth()));
      if (active_.empty() && joining.empty() && dropped.empty()) {
        // Cancellation of a queued request sets a flag without waking us: look
        // again at least every 50 ms.
        const double wait = std::min(adm.wake_at - now, 0.05);
        cv_.wait_for(l, std::chrono::duration<double>(std::max(wait, 0.0)));
        continue;
      }
    }
    for (auto& [job, status] : dropped) {
      registry_->CounterAdd("sdserve_requests_total", "Finished requests by outcome",
                            {{"code", absl::StatusCodeToString(status.code())}});
      job->Finish(status);
    }
    if (!joining.empty()) StartRequests(joining, joining_arrival, now);
    now = Now();
    DropCancelled(now);
    if (!active_.empty()) DenoiseStep();
    int64_t done_images = 0;
    for (const auto& a : active_)
      if (a->step == static_cast<size_t>(a->steps)) done_images += a->n;
    FinishDone(Now());
    now = Now();
    if (done_images > 0) finished.emplace_back(now, done_images);
    while (!finished.empty() && finished.front().first < now - 60) finished.pop_front();
    int64_t running = 0;
    for (const auto& a : active_) running += a->n;
    {
      std::lock_guard l(mu_);
      running_images_ = running;
      if (!finished.empty()) {
        int64_t total = 0;
        for (const auto& [t, k] : finished) total += k;
        images_per_s_ = static_cast<double>(total) / std::max(1.0, now - finished.front().first);
      }
    }
    registry_->GaugeSet("sdserve_running_images", "Images in the running UNet batch", {},
                        static_cast<double>(running));
  }
  // Shutting down: nobody is left waiting for an answer that never comes.
  std::lock_guard l(mu_);
  for (auto& [id, job] : pending_)
    job->Finish(absl::UnavailableError("the server is shutting down"));
  pending_.clear();
  for (auto& a : active_) a->job->Finish(absl::UnavailableError("the server is shutting down"));
  active_.clear();
}

void Engine::StartRequests(const std::vector<std::shared_ptr<Job>>& jobs,
                           const std::vector<double>& arrivals, double now) {
  // One text-encoder batch for everybody joining: each prompt, then the negative
  // prompt of each request that runs classifier-free guidance.
  std::vector<std::string> texts;
  std::vector<bool> cfg(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const GenerationRequest& r = jobs[i]->request();
    cfg[i] = *r.guidance_scale > 1.0 && guidance_dim_ == 0;
    texts.push_back(r.prompt);
  }
  for (size_t i = 0; i < jobs.size(); ++i)
    if (cfg[i]) texts.push_back(jobs[i]->request().negative_prompt);
  try {
    torch::InferenceMode guard;
    const torch::Tensor embeds = sd_.EncodePrompts(texts);
    const int64_t f = sd_.vae_scale_factor();
    size_t neg = jobs.size();
    for (size_t i = 0; i < jobs.size(); ++i) {
      const GenerationRequest& r = jobs[i]->request();
      auto a = std::make_unique<Active>();
      a->job = jobs[i];
      a->arrival = arrivals[i];
      a->n = r.n;
      a->height = r.height;
      a->width = r.width;
      a->steps = r.steps;
      a->cfg = cfg[i];
      a->guidance = *r.guidance_scale;
      a->deadline = now + r.timeout_s;
      auto scheduler =
          MakeScheduler(r.scheduler.empty() ? "default" : r.scheduler, sd_.scheduler_config);
      if (!scheduler.ok()) {
        jobs[i]->Finish(scheduler.status());
        continue;
      }
      a->scheduler = std::move(*scheduler);
      a->scheduler->SetTimesteps(r.steps);
      const torch::Tensor cond = embeds.slice(0, i, i + 1).repeat_interleave(r.n, 0);
      a->context =
          cfg[i] ? torch::cat({embeds.slice(0, neg, neg + 1).repeat_interleave(r.n, 0), cond}, 0)
                 : cond;
      if (cfg[i]) ++neg;
      // The noise of sdctl generate --seed S --images-per-prompt n: drawn in fp32
      // on the CPU, so each request's images do not depend on who shares its batch.
      auto gen = at::make_generator<at::CPUGeneratorImpl>(r.seed);
      a->latents = at::randn({r.n, sd_.unet->config().in_channels, r.height / f, r.width / f}, gen,
                             torch::TensorOptions().dtype(torch::kFloat32))
                       .to(sd_.device, sd_.dtype) *
                   a->scheduler->init_noise_sigma();
      if (guidance_dim_ > 0)
        a->timestep_cond =
            GuidanceScaleEmbedding(torch::full({r.n}, a->guidance - 1.0), guidance_dim_)
                .to(sd_.device, sd_.dtype);
      registry_->HistogramObserve("sdserve_queue_seconds", "Arrival to first denoising step", {},
                                  now - a->arrival, LatencyBuckets());
      jobs[i]->SetStarted(now - a->arrival);
      active_.push_back(std::move(a));
    }
  } catch (const c10::Error& e) {
    for (auto& j : jobs)
      if (!j->Get().done)
        j->Finish(absl::InternalError(
            absl::StrCat("encoding the prompt failed: ", e.what_without_backtrace())));
    active_.erase(std::remove_if(active_.begin(), active_.end(),
                                 [](const auto& a) { return a->job->Get().done; }),
                  active_.end());
  }
}

void Engine::DropCancelled(double now) {
  for (auto& a : active_) {
    if (a->job->cancelled())
      Complete(*a, absl::CancelledError("cancelled by the client"), {}, now);
    else if (a->deadline <= now)
      Complete(*a, absl::DeadlineExceededError("the request's deadline passed"), {}, now);
  }
  active_.erase(
      std::remove_if(active_.begin(), active_.end(), [](const auto& a) { return !a->job; }),
      active_.end());
}

void Engine::DenoiseStep() {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    torch::InferenceMode guard;
    std::vector<torch::Tensor> inputs, contexts, timesteps, conds;
    int64_t images = 0;
    for (auto& a : active_) {
      auto x = a->cfg ? torch::cat({a->latents, a->latents}, 0) : a->latents;
      inputs.push_back(a->scheduler->ScaleModelInput(x, a->step));
      contexts.push_back(a->context);
      timesteps.push_back(torch::full({x.size(0)}, a->scheduler->timesteps()[a->step],
                                      torch::TensorOptions().dtype(torch::kFloat32)));
      if (guidance_dim_ > 0) conds.push_back(a->timestep_cond);
      images += a->n;
    }
    const torch::Tensor input = torch::cat(inputs, 0);
    const torch::Tensor t = torch::cat(timesteps, 0).to(sd_.device);
    const torch::Tensor context = torch::cat(contexts, 0);
    const torch::Tensor cond = conds.empty() ? torch::Tensor() : torch::cat(conds, 0);
    torch::Tensor eps;
    if (o_.inference.cuda_graphs && sd_.device.is_cuda()) {
      if (!sd_.unet_graph) sd_.unet_graph = std::make_shared<UNetGraph>(sd_.unet);
      eps = sd_.unet_graph->Forward(input, t, context, cond);
    } else {
      eps = sd_.unet->forward(input, t, context, cond);
    }
    int64_t offset = 0;
    for (auto& a : active_) {
      const int64_t rows = a->cfg ? 2 * a->n : a->n;
      torch::Tensor e = eps.slice(0, offset, offset + rows);
      offset += rows;
      if (a->cfg) {
        auto parts = e.chunk(2, 0);
        e = parts[0] + a->guidance * (parts[1] - parts[0]);
      }
      a->latents = a->scheduler->Step(e, a->step, a->latents);
      ++a->step;
      a->job->SetProgress(static_cast<int64_t>(a->step), a->steps);
    }
    registry_->HistogramObserve("sdserve_batch_images", "Images in each UNet step's batch", {},
                                static_cast<double>(images), BatchBuckets());
    registry_->CounterAdd("sdserve_unet_steps_total", "UNet forward passes (denoising steps)", {});
    registry_->CounterAdd("sdserve_unet_sample_steps_total",
                          "Image denoising steps done (a batch of 4 counts 4)", {},
                          static_cast<double>(images));
    registry_->HistogramObserve(
        "sdserve_unet_step_seconds", "Time of one batched denoising step", {},
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
        LatencyBuckets());
  } catch (const c10::Error& e) {
    const absl::Status s =
        absl::InternalError(absl::StrCat("denoising failed: ", e.what_without_backtrace()));
    for (auto& a : active_) Complete(*a, s, {}, Now());
    active_.clear();
  }
}

void Engine::FinishDone(double now) {
  std::vector<Active*> done;
  for (auto& a : active_)
    if (a->job && a->step == static_cast<size_t>(a->steps)) done.push_back(a.get());
  if (done.empty()) return;
  // One VAE batch per resolution (one resolution unless batching is off).
  while (!done.empty()) {
    std::vector<Active*> group;
    std::vector<Active*> rest;
    for (Active* a : done)
      (a->height == done.front()->height && a->width == done.front()->width ? group : rest)
          .push_back(a);
    done = std::move(rest);
    try {
      torch::InferenceMode guard;
      std::vector<torch::Tensor> zs;
      zs.reserve(group.size());
      for (Active* a : group) zs.push_back(a->latents);
      auto z = torch::cat(zs, 0) / sd_.vae->config().scaling_factor;
      auto images = DecodeLatents(*sd_.vae, z, o_.inference);
      images = (images.to(torch::kFloat32) / 2 + 0.5).clamp(0, 1);
      images = images.permute({0, 2, 3, 1}).contiguous().to(torch::kCPU);
      int64_t offset = 0;
      for (Active* a : group) {
        Complete(*a, absl::OkStatus(), images.slice(0, offset, offset + a->n).clone(), Now());
        offset += a->n;
      }
    } catch (const c10::Error& e) {
      const absl::Status s =
          absl::InternalError(absl::StrCat("decoding failed: ", e.what_without_backtrace()));
      for (Active* a : group) Complete(*a, s, {}, now);
    }
  }
  active_.erase(
      std::remove_if(active_.begin(), active_.end(), [](const auto& a) { return !a->job; }),
      active_.end());
}

void Engine::Complete(Active& a, absl::Status s, const torch::Tensor& images, double now) {
  Job::PngEncoder pngs;
  if (images.defined()) {
    pngs = [images]() -> absl::StatusOr<std::vector<std::string>> {
      std::vector<std::string> out;
      for (int64_t i = 0; i < images.size(0); ++i) {
        auto png = EncodePng(images[i]);
        if (!png.ok()) return png.status();
        out.push_back(std::move(*png));
      }
      return out;
    };
  }
  registry_->CounterAdd("sdserve_requests_total", "Finished requests by outcome",
                        {{"code", absl::StatusCodeToString(s.code())}});
  if (s.ok()) {
    registry_->CounterAdd("sdserve_images_total", "Images generated", {}, static_cast<double>(a.n));
    registry_->HistogramObserve("sdserve_request_latency_seconds",
                                "Arrival to last image decoded, successful requests", {},
                                now - a.arrival, LatencyBuckets());
  }
  a.job->Finish(std::move(s), std::move(pngs));
  a.job.reset();  // marks the slot free; the caller erases it
}

}  // namespace sd::serve
