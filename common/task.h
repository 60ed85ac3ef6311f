#pragma once
// One rank's share of one attempt of a stage: what the coordinator hands a worker
// and the worker turns into the stage's context. The one type for it on both
// sides of the wire (proto/sd/v1/workers.proto's Task is its encoding).
#include <cstdint>
#include <string>

namespace sd {

struct TaskAssignment {
  std::string task_id;  // job/stage/attempt
  std::string job_id;
  std::string stage;
  int64_t rank = 0;
  int64_t world_size = 1;
  std::string rendezvous;  // host:port of the c10d TCPStore served by rank 0
  std::string backend;     // "gloo" or "nccl"
  std::string job_yaml;
  std::string checkpoint_dir;  // shared storage for this stage's checkpoints
  std::string output_dir;      // where this attempt writes its result
  std::string input_model;     // the previous model-producing stage's result, or the job's model
  std::string teacher_model;   // the job's model
  std::string artifacts_dir;   // the job's artifacts folder
  std::string crash_report;    // where the worker writes its last words if it dies of a signal
};

}  // namespace sd
