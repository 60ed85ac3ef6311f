#pragma once
// gRPC adapters: one class per service, all policy in CoordinatorCore.
#include <functional>

#include "common/grpc_status.h"
#include "coordinator/coordinator_core.h"
#include "sd/v1/jobs.grpc.pb.h"
#include "sd/v1/workers.grpc.pb.h"

namespace sd::coord {

using Clock = std::function<double()>;

class JobServiceImpl final : public sd::v1::JobService::Service {
 public:
  JobServiceImpl(CoordinatorCore* core, Clock now) : core_(core), now_(std::move(now)) {}
  grpc::Status SubmitJob(grpc::ServerContext*, const sd::v1::SubmitJobRequest*,
                         sd::v1::SubmitJobResponse*) override;
  grpc::Status GetJob(grpc::ServerContext*, const sd::v1::GetJobRequest*, sd::v1::Job*) override;
  grpc::Status ListJobs(grpc::ServerContext*, const sd::v1::ListJobsRequest*,
                        sd::v1::ListJobsResponse*) override;
  grpc::Status CancelJob(grpc::ServerContext*, const sd::v1::CancelJobRequest*,
                         sd::v1::CancelJobResponse*) override;
  grpc::Status ResumeJob(grpc::ServerContext*, const sd::v1::ResumeJobRequest*,
                         sd::v1::ResumeJobResponse*) override;
  grpc::Status StreamEvents(grpc::ServerContext*, const sd::v1::StreamEventsRequest*,
                            grpc::ServerWriter<sd::v1::JobEvent>*) override;
  grpc::Status ListWorkers(grpc::ServerContext*, const sd::v1::ListWorkersRequest*,
                           sd::v1::ListWorkersResponse*) override;

 private:
  CoordinatorCore* core_;
  Clock now_;
};

class WorkerServiceImpl final : public sd::v1::WorkerService::Service {
 public:
  WorkerServiceImpl(CoordinatorCore* core, Clock now, double heartbeat_interval_s, double lease_s)
      : core_(core),
        now_(std::move(now)),
        heartbeat_interval_s_(heartbeat_interval_s),
        lease_s_(lease_s) {}
  grpc::Status Register(grpc::ServerContext*, const sd::v1::RegisterRequest*,
                        sd::v1::RegisterResponse*) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const sd::v1::HeartbeatRequest*,
                         sd::v1::HeartbeatResponse*) override;
  grpc::Status PollTask(grpc::ServerContext*, const sd::v1::PollTaskRequest*,
                        sd::v1::PollTaskResponse*) override;
  grpc::Status ReportProgress(grpc::ServerContext*, const sd::v1::ProgressRequest*,
                              sd::v1::ProgressResponse*) override;
  grpc::Status Finish(grpc::ServerContext*, const sd::v1::FinishRequest*,
                      sd::v1::FinishResponse*) override;

 private:
  CoordinatorCore* core_;
  Clock now_;
  double heartbeat_interval_s_;
  double lease_s_;
};

using sd::ToGrpc;
void ToProto(const JobRecord& j, sd::v1::Job* out);

}  // namespace sd::coord
