#include "serve/job.h"

#include <chrono>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace sd::serve {
namespace {
constexpr char kFieldPayload[] = "type.sdcompress.dev/field";
}  // namespace

absl::Status FieldError(const std::string& field, const std::string& message) {
  absl::Status s = absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
  s.SetPayload(kFieldPayload, absl::Cord(field));
  return s;
}

std::string ErrorField(const absl::Status& s) {
  auto p = s.GetPayload(kFieldPayload);
  return p ? std::string(*p) : std::string();
}

Job::Snapshot Job::WaitChange(int64_t seen_version, double timeout_s) {
  std::unique_lock l(mu_);
  cv_.wait_for(l, std::chrono::duration<double>(timeout_s),
               [&] { return state_.version != seen_version; });
  return state_;
}

Job::Snapshot Job::Get() {
  std::lock_guard l(mu_);
  return state_;
}

void Job::SetProgress(int64_t step, int64_t total) {
  {
    std::lock_guard l(mu_);
    state_.step = step;
    state_.total = total;
    ++state_.version;
  }
  cv_.notify_all();
}

void Job::SetStarted(double queue_s) {
  {
    std::lock_guard l(mu_);
    state_.queue_s = queue_s;
    ++state_.version;
  }
  cv_.notify_all();
}

void Job::Finish(absl::Status s, PngEncoder pngs) {
  {
    std::lock_guard l(mu_);
    if (state_.done) return;  // the first answer stands
    state_.done = true;
    state_.status = std::move(s);
    state_.pngs = std::move(pngs);
    ++state_.version;
  }
  cv_.notify_all();
}

}  // namespace sd::serve
