#include "serve/batcher.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace sd::serve {

absl::StatusOr<Batching> ParseBatching(std::string_view name) {
  if (name == "none") return Batching::kNone;
  if (name == "dynamic") return Batching::kDynamic;
  if (name == "continuous") return Batching::kContinuous;
  return absl::InvalidArgumentError(absl::StrCat(
      "--batching must be none, dynamic or continuous, got \"", std::string(name), "\""));
}

const char* BatchingName(Batching b) {
  switch (b) {
    case Batching::kNone:
      return "none";
    case Batching::kDynamic:
      return "dynamic";
    case Batching::kContinuous:
      return "continuous";
  }
  return "?";
}

absl::Status ValidateBatcherOptions(const BatcherOptions& o) {
  if (o.max_batch_size < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("--max-batch-size must be >= 1, got ", o.max_batch_size));
  if (o.max_queue < 1)
    return absl::InvalidArgumentError(absl::StrCat("--max-queue must be >= 1, got ", o.max_queue));
  if (!(o.max_queue_delay_s >= 0))
    return absl::InvalidArgumentError(
        absl::StrCat("--max-queue-delay-ms must be >= 0, got ", o.max_queue_delay_s * 1000));
  for (int64_t p : o.preferred_batch_sizes) {
    if (p < 1 || p > o.max_batch_size)
      return absl::InvalidArgumentError(
          absl::StrCat("--preferred-batch-sizes ", absl::StrJoin(o.preferred_batch_sizes, ","),
                       ": each must be in [1, --max-batch-size ", o.max_batch_size, "], got ", p));
  }
  return absl::OkStatus();
}

absl::Status Batcher::Enqueue(const QueuedRequest& r) {
  if (r.images < 1 || r.images > o_.max_batch_size)
    return absl::InvalidArgumentError(absl::StrCat("n: ", r.images,
                                                   " images do not fit this server's batch of ",
                                                   o_.max_batch_size, " (--max-batch-size)"));
  if (depth() >= o_.max_queue)
    return absl::ResourceExhaustedError(
        absl::StrCat("the queue is full (", o_.max_queue, " requests waiting); retry later"));
  queue_.push_back(r);
  return absl::OkStatus();
}

bool Batcher::Remove(uint64_t id) {
  auto it = std::find_if(queue_.begin(), queue_.end(),
                         [id](const QueuedRequest& r) { return r.id == id; });
  if (it == queue_.end()) return false;
  queue_.erase(it);
  return true;
}

std::vector<uint64_t> Batcher::TakeExpired(double now) {
  std::vector<uint64_t> out;
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->deadline <= now) {
      out.push_back(it->id);
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

int64_t Batcher::queued_images() const {
  int64_t n = 0;
  for (const auto& r : queue_) n += r.images;
  return n;
}

bool Batcher::Compatible(const QueuedRequest& r, const RunningBatch& b) const {
  if (b.images == 0) return true;
  if (r.height != b.height || r.width != b.width) return false;
  return o_.batching != Batching::kDynamic || r.steps == b.steps;
}

Admission Batcher::Admit(double now, const RunningBatch& running) {
  Admission a;
  if (queue_.empty()) return a;
  switch (o_.batching) {
    case Batching::kNone:
      if (running.images == 0) {
        a.admit.push_back(queue_.front().id);
        queue_.pop_front();
      }
      return a;
    case Batching::kDynamic:
      return running.images == 0 ? AdmitDynamic(now) : a;
    case Batching::kContinuous: {
      // Strictly in arrival order: a request that cannot join yet (another
      // resolution, or no room) holds back those behind it, so the running batch
      // drains and it goes next instead of starving behind a stream of small ones.
      RunningBatch b = running;
      while (!queue_.empty()) {
        const QueuedRequest& r = queue_.front();
        if (!Compatible(r, b) || b.images + r.images > o_.max_batch_size) break;
        if (b.images == 0) {
          b.height = r.height;
          b.width = r.width;
          b.steps = r.steps;
        }
        b.images += r.images;
        a.admit.push_back(r.id);
        queue_.pop_front();
      }
      return a;
    }
  }
  return a;
}

Admission Batcher::AdmitDynamic(double now) {
  Admission a;
  const QueuedRequest& first = queue_.front();
  RunningBatch key{0, first.height, first.width, first.steps};
  key.images = 1;  // so Compatible compares the key
  // The requests that could share the first one's batch, in order, while they fit.
  std::vector<size_t> picked;
  std::vector<int64_t> prefix;  // images after each pick
  int64_t total = 0;
  for (size_t i = 0; i < queue_.size(); ++i) {
    const QueuedRequest& r = queue_[i];
    if (!Compatible(r, key)) continue;
    if (total + r.images > o_.max_batch_size) break;
    total += r.images;
    picked.push_back(i);
    prefix.push_back(total);
  }
  size_t take = 0;
  if (total == o_.max_batch_size || now >= first.arrival + o_.max_queue_delay_s) {
    take = picked.size();
  } else {
    // The largest preferred size some prefix reaches exactly.
    for (size_t k = picked.size(); k-- > 0 && take == 0;) {
      if (std::find(o_.preferred_batch_sizes.begin(), o_.preferred_batch_sizes.end(), prefix[k]) !=
          o_.preferred_batch_sizes.end())
        take = k + 1;
    }
  }
  if (take == 0) {
    a.wake_at = first.arrival + o_.max_queue_delay_s;
    return a;
  }
  std::vector<uint64_t> ids;
  for (size_t k = 0; k < take; ++k) ids.push_back(queue_[picked[k]].id);
  for (uint64_t id : ids) Remove(id);
  a.admit = std::move(ids);
  return a;
}

}  // namespace sd::serve
