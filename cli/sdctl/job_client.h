#pragma once
// sdctl's client of the coordinator's JobService, behind plain types (no protobuf
// in this header: sdctl also links LibTorch, whose wheel carries older protobuf headers).
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sdctl {

struct StageView {
  std::string name, state;
  int64_t step = 0, total_steps = 0, restarts = 0, world_size = 1;
  double loss = 0;
};
struct JobView {
  std::string id, name, state;
  std::vector<StageView> stages;
};
struct WorkerView {
  std::string id, device, task;
  int64_t device_count = 0;
  int64_t memory_bytes = 0;
  double heartbeat_age_s = 0;
  bool alive = false;
  std::string metrics_address;
};

class JobClient {
 public:
  static std::unique_ptr<JobClient> Connect(const std::string& address);
  ~JobClient();
  absl::StatusOr<std::string> Submit(const std::string& yaml, const std::string& origin);
  absl::StatusOr<JobView> Get(const std::string& id);
  absl::StatusOr<std::vector<JobView>> List();
  absl::Status Cancel(const std::string& id);
  absl::Status Resume(const std::string& id);
  absl::StatusOr<std::vector<WorkerView>> Workers();
  // Calls on_event(seq, text, job) for each event after `after`; with follow, until the job ends.
  absl::Status Events(
      const std::string& id, int64_t after, bool follow,
      const std::function<void(int64_t, const std::string&, const JobView&)>& on_event);

 private:
  struct Impl;
  explicit JobClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sdctl
