#pragma once
// What sdserve's front ends (HTTP, gRPC) and its engine share, without LibTorch:
// the gRPC front end must not see the torch wheel's older protobuf headers, so
// this side of the server never includes torch.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sd::serve {

// One generation as the front ends parse it; 0 / empty fields take the model's
// defaults when it is submitted.
struct GenerationRequest {
  std::string prompt;
  std::string negative_prompt;
  int64_t n = 1;
  int64_t width = 0, height = 0;
  int64_t steps = 0;
  std::optional<double> guidance_scale;  // unset: 7.5
  uint64_t seed = 0;
  std::string scheduler;  // empty: the model's own
  double timeout_s = 0;   // 0: the server's --request-timeout
};

// InvalidArgument "<field>: <message>" that remembers the field.
absl::Status FieldError(const std::string& field, const std::string& message);
// The field a validation error is about ("prompt", "n", "size", "steps", ...),
// empty if none; front ends report it (OpenAI's error.param, HTTP 400).
std::string ErrorField(const absl::Status& s);

// A submitted request as its front end sees it. The engine writes, the front end
// waits on changes and may cancel.
class Job {
 public:
  using PngEncoder = std::function<absl::StatusOr<std::vector<std::string>>()>;
  struct Snapshot {
    int64_t version = 0;  // bumps on every change
    int64_t step = 0, total = 0;
    double queue_s = -1;  // -1 until it starts
    bool done = false;
    absl::Status status;  // when done
    // When done and ok: encodes the images as PNG files, in the caller's thread
    // (so the engine thread does not spend its steps on zlib).
    PngEncoder pngs;
  };
  explicit Job(GenerationRequest r) : request_(std::move(r)) {}

  // Blocks until the state's version differs from `seen_version`, or timeout.
  Snapshot WaitChange(int64_t seen_version, double timeout_s);
  Snapshot Get();
  // The client went away or asked to stop: the engine drops the request at the
  // next step boundary (or before it starts) and frees its slot.
  void Cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  // The request with the server's defaults filled in.
  const GenerationRequest& request() const { return request_; }

  // The engine's side.
  void SetProgress(int64_t step, int64_t total);
  void SetStarted(double queue_s);
  void Finish(absl::Status s, PngEncoder pngs = {});

 private:
  const GenerationRequest request_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  Snapshot state_;
};

struct ServiceHealth {
  bool ready = false;
  int64_t queue_depth = 0;
  int64_t running_images = 0;
};

// What a front end talks to (the Engine; a fake in tests).
class ImageService {
 public:
  virtual ~ImageService() = default;
  // Fills defaults and validates (InvalidArgument naming the field), then queues
  // (ResourceExhausted when the queue is full; Unavailable when shutting down).
  virtual absl::StatusOr<std::shared_ptr<Job>> Submit(GenerationRequest r) = 0;
  // Seconds until a slot is likely free, for Retry-After; at least 1.
  virtual int64_t retry_after_s() = 0;
  virtual ServiceHealth health() = 0;
  virtual std::string model_name() const = 0;
  virtual std::string batching() const = 0;
  // Requests the service may hold at once (queued plus running), so a front end
  // can size its threads to answer the next one with a 429 instead of queueing it.
  virtual int64_t capacity() const = 0;
};

}  // namespace sd::serve
