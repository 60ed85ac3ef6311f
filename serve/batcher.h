#pragma once
// sdserve's batching policy, apart from the model and the sockets: which queued
// requests join the UNet batch now. The engine asks at every step boundary.
//
//   none        one request at a time (its n images are one batch), as sdctl generate.
//   dynamic     Triton's dynamic batcher: when the UNet is idle, start a batch of
//               queued requests that share resolution and step count, at a preferred
//               size or when the oldest has waited max_queue_delay; it runs to its end.
//   continuous  step-level: a request joins the running batch at the next step
//               boundary (each sample carries its own timestep) and leaves when its
//               steps are done, so a short request never waits for a long batch.
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sd::serve {

enum class Batching { kNone, kDynamic, kContinuous };
absl::StatusOr<Batching> ParseBatching(std::string_view name);
const char* BatchingName(Batching b);

struct BatcherOptions {
  Batching batching = Batching::kContinuous;
  // Images in one UNet batch (with classifier-free guidance each image is two UNet
  // rows); a request asking for more images than this is refused.
  int64_t max_batch_size = 8;
  // dynamic: how long the oldest request may wait for a fuller batch.
  double max_queue_delay_s = 0.05;
  // dynamic: batch sizes (in images) worth starting at without waiting.
  std::vector<int64_t> preferred_batch_sizes;
  // Requests waiting to start; past it Enqueue refuses (HTTP 429, RESOURCE_EXHAUSTED).
  int64_t max_queue = 32;
};
// Names the bad option.
absl::Status ValidateBatcherOptions(const BatcherOptions& o);

struct QueuedRequest {
  uint64_t id = 0;
  int64_t images = 1;
  // What must match to share a batch: the latent resolution always; under dynamic
  // batching also the step count, since its batches run in lockstep to the end.
  int64_t height = 0, width = 0, steps = 0;
  double arrival = 0;  // seconds on the engine's clock
  double deadline = std::numeric_limits<double>::infinity();
};

// What is denoising now.
struct RunningBatch {
  int64_t images = 0;
  int64_t height = 0, width = 0, steps = 0;  // meaningful when images > 0
};

struct Admission {
  std::vector<uint64_t> admit;  // in queue order
  // With nothing admitted: when asking again could admit something without a new
  // arrival (the dynamic batcher's delay running out); infinity: only on arrival.
  double wake_at = std::numeric_limits<double>::infinity();
};

class Batcher {
 public:
  explicit Batcher(BatcherOptions o) : o_(std::move(o)) {}
  const BatcherOptions& options() const { return o_; }

  // ResourceExhausted when the queue is full; InvalidArgument when one request
  // asks for more images than a batch holds.
  absl::Status Enqueue(const QueuedRequest& r);
  // Takes a request out of the queue (cancelled before it started); false if absent.
  bool Remove(uint64_t id);
  // Takes out and returns the requests whose deadline has passed.
  std::vector<uint64_t> TakeExpired(double now);
  // Takes out the requests that start now.
  Admission Admit(double now, const RunningBatch& running);

  int64_t depth() const { return static_cast<int64_t>(queue_.size()); }
  int64_t queued_images() const;

 private:
  Admission AdmitDynamic(double now);
  bool Compatible(const QueuedRequest& r, const RunningBatch& b) const;

  BatcherOptions o_;
  std::deque<QueuedRequest> queue_;
};

}  // namespace sd::serve
