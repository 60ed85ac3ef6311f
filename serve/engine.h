#pragma once
// sdserve's engine: the one thread that runs the model, in the step lifecycle of
// vllm-omni's and SGLang-Diffusion's schedulers (encode the prompts of requests
// that join, one UNet step for every running sample with its own timestep, each
// request's scheduler step, decode those that are done). The Batcher decides who
// joins at each step boundary; the front ends (HTTP, gRPC) submit and wait.
#include <torch/torch.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "sd/pipeline/stable_diffusion.h"
#include "serve/batcher.h"
#include "serve/job.h"

namespace sd::serve {

struct EngineOptions {
  BatcherOptions batcher;
  InferenceOptions inference;
  std::string model_name = "sdcompress";
  int64_t default_steps = 50;  // a distilled model's own count
  int64_t max_steps = 150;
  int64_t max_side = 2048;  // pixels per side
  double request_timeout_s = 600;
  uint64_t seed = 0;  // token merging's destination draws (one stream for the server)
};

class Engine final : public ImageService {
 public:
  // Takes the loaded model; checks the options and starts the engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Start(StableDiffusion model, EngineOptions o,
                                                       metrics::Registry* registry);
  // Stops the engine thread and fails what is still queued or running with
  // Unavailable (so front ends answer at once); Submit refuses from then on.
  void Shutdown();
  ~Engine() override;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  absl::StatusOr<std::shared_ptr<Job>> Submit(GenerationRequest r) override;
  // The images queued and running over the last minute's throughput.
  int64_t retry_after_s() override;
  ServiceHealth health() override;
  std::string model_name() const override { return o_.model_name; }
  std::string batching() const override { return BatchingName(o_.batcher.batching); }
  int64_t capacity() const override { return o_.batcher.max_queue + o_.batcher.max_batch_size; }
  const EngineOptions& options() const { return o_; }
  int64_t default_width() const { return default_side_; }
  int64_t default_height() const { return default_side_; }

 private:
  struct Active;
  Engine(StableDiffusion model, EngineOptions o, metrics::Registry* registry);
  absl::Status Validate(GenerationRequest& r) const;
  void Loop();
  void StartRequests(const std::vector<std::shared_ptr<Job>>& jobs,
                     const std::vector<double>& arrivals, double now);
  void DenoiseStep();
  void FinishDone(double now);
  void DropCancelled(double now);
  void Complete(Active& a, absl::Status s, const torch::Tensor& images, double now);

  StableDiffusion sd_;
  const EngineOptions o_;
  metrics::Registry* registry_;
  int64_t default_side_ = 0;
  int64_t guidance_dim_ = 0;

  std::mutex mu_;  // guards batcher_, pending_, next_id_, stop_, running_images_, the rate
  std::condition_variable cv_;
  Batcher batcher_;
  std::map<uint64_t, std::shared_ptr<Job>> pending_;
  std::map<uint64_t, double> arrival_;
  uint64_t next_id_ = 1;
  bool stop_ = false;
  int64_t running_images_ = 0;
  double images_per_s_ = 0;  // exponential average of finished images per second

  // Engine thread only.
  std::vector<std::unique_ptr<Active>> active_;
  std::thread thread_;
};

}  // namespace sd::serve
