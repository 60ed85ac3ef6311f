#pragma once
// The worker's side of the sd.v1 WorkerService, behind plain types: this header
// includes no protobuf, so it can sit beside LibTorch (whose wheel ships its own,
// older protobuf headers).
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/task.h"

namespace sd::worker {

struct Registration {
  double heartbeat_interval_s = 1;
  double lease_s = 0;  // 0: no lease (an older coordinator)
};

// The worker's own small gRPC server: grpc.health.v1 plus sd.v1.WorkerAgent.
// `describe` is called per request and fills (resources, current task).
struct WorkerDescription {
  std::string worker_id, device, task_id;
  int64_t device_count = 0, memory_bytes = 0, cpu_cores = 0;
};
class AgentServer {
 public:
  // port 0 picks a free port.
  static absl::StatusOr<std::unique_ptr<AgentServer>> Start(
      const std::string& host, int port, std::function<WorkerDescription()> describe);
  ~AgentServer();
  int port() const { return port_; }

 private:
  struct Impl;
  AgentServer() = default;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

class CoordinatorClient {
 public:
  static std::unique_ptr<CoordinatorClient> Connect(const std::string& address,
                                                    const std::string& worker_id);
  ~CoordinatorClient();
  // `running_task`/`rank`: the task this worker is still running ("" when idle).
  absl::StatusOr<Registration> Register(const std::string& device, int64_t device_count,
                                        int64_t cpu_cores, int64_t memory_bytes,
                                        const std::string& metrics_address,
                                        const std::string& running_task, int64_t rank);
  // Returns the id of a task to abort, or "". NotFound: register again.
  absl::StatusOr<std::string> Heartbeat();
  absl::StatusOr<std::optional<TaskAssignment>> Poll();
  // Returns true when the coordinator wants the task aborted. FailedPrecondition:
  // the attempt is not current (stop it); NotFound: register again.
  absl::StatusOr<bool> Progress(const std::string& task_id, int64_t step, double loss,
                                double step_time_s, double samples_per_s,
                                const std::vector<std::string>& log_lines);
  absl::Status Finish(const std::string& task_id, const absl::Status& result,
                      const std::vector<std::string>& log_lines);

 private:
  struct Impl;
  explicit CoordinatorClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sd::worker
