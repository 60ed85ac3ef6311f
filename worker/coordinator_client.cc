#include "worker/coordinator_client.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "sd/v1/workers.grpc.pb.h"

namespace sd::worker {
namespace {

absl::Status FromGrpc(const grpc::Status& s, const char* what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

void Deadline(grpc::ClientContext& ctx, int seconds) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
}

}  // namespace

struct AgentServer::Impl final : public sd::v1::WorkerAgent::Service {
  std::function<WorkerDescription()> describe;
  std::unique_ptr<grpc::Server> server;
  grpc::Status Describe(grpc::ServerContext*, const sd::v1::DescribeRequest*,
                        sd::v1::DescribeResponse* resp) override {
    const WorkerDescription d = describe();
    resp->set_worker_id(d.worker_id);
    resp->set_task_id(d.task_id);
    auto* r = resp->mutable_resources();
    r->set_device(d.device);
    r->set_device_count(static_cast<int32_t>(d.device_count));
    r->set_memory_bytes(d.memory_bytes);
    r->set_cpu_cores(static_cast<int32_t>(d.cpu_cores));
    return grpc::Status::OK;
  }
};

absl::StatusOr<std::unique_ptr<AgentServer>> AgentServer::Start(
    const std::string& host, int port, std::function<WorkerDescription()> describe) {
  std::unique_ptr<AgentServer> a(new AgentServer());
  a->impl_ = std::make_unique<Impl>();
  a->impl_->describe = std::move(describe);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(host, ":", port), grpc::InsecureServerCredentials(),
                           &a->port_);
  builder.RegisterService(a->impl_.get());
  a->impl_->server = builder.BuildAndStart();
  if (!a->impl_->server || a->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("worker cannot serve gRPC on ", host, ":", port));
  }
  return a;
}

AgentServer::~AgentServer() {
  if (impl_ && impl_->server) impl_->server->Shutdown();
}

struct CoordinatorClient::Impl {
  std::string id;
  std::unique_ptr<sd::v1::WorkerService::Stub> stub;
};

CoordinatorClient::CoordinatorClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CoordinatorClient::~CoordinatorClient() = default;

std::unique_ptr<CoordinatorClient> CoordinatorClient::Connect(const std::string& address,
                                                              const std::string& worker_id) {
  auto impl = std::make_unique<Impl>();
  impl->id = worker_id;
  impl->stub = sd::v1::WorkerService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  return std::unique_ptr<CoordinatorClient>(new CoordinatorClient(std::move(impl)));
}

absl::StatusOr<Registration> CoordinatorClient::Register(
    const std::string& device, int64_t device_count, int64_t cpu_cores, int64_t memory_bytes,
    const std::string& metrics_address, const std::string& running_task, int64_t rank) {
  sd::v1::RegisterRequest req;
  req.set_worker_id(impl_->id);
  req.mutable_resources()->set_device(device);
  req.mutable_resources()->set_device_count(static_cast<int32_t>(device_count));
  req.mutable_resources()->set_cpu_cores(static_cast<int32_t>(cpu_cores));
  req.mutable_resources()->set_memory_bytes(memory_bytes);
  req.set_metrics_address(metrics_address);
  req.set_running_task_id(running_task);
  req.set_running_rank(static_cast<int32_t>(rank));
  sd::v1::RegisterResponse resp;
  grpc::ClientContext ctx;
  Deadline(ctx, 5);
  auto s = FromGrpc(impl_->stub->Register(&ctx, req, &resp), "register");
  if (!s.ok()) return s;
  return Registration{resp.heartbeat_interval_s(), resp.lease_s()};
}

absl::StatusOr<std::string> CoordinatorClient::Heartbeat() {
  sd::v1::HeartbeatRequest req;
  req.set_worker_id(impl_->id);
  sd::v1::HeartbeatResponse resp;
  grpc::ClientContext ctx;
  Deadline(ctx, 5);
  auto s = FromGrpc(impl_->stub->Heartbeat(&ctx, req, &resp), "heartbeat");
  if (!s.ok()) return s;
  return resp.abort_task_id();
}

absl::StatusOr<std::optional<TaskAssignment>> CoordinatorClient::Poll() {
  sd::v1::PollTaskRequest req;
  req.set_worker_id(impl_->id);
  sd::v1::PollTaskResponse resp;
  grpc::ClientContext ctx;
  Deadline(ctx, 5);
  auto s = FromGrpc(impl_->stub->PollTask(&ctx, req, &resp), "poll");
  if (!s.ok()) return s;
  if (!resp.has_task()) return std::optional<TaskAssignment>();
  const auto& t = resp.task();
  TaskAssignment a;
  a.task_id = t.task_id();
  a.job_id = t.job_id();
  a.stage = t.stage();
  a.rank = t.rank();
  a.world_size = t.world_size();
  a.rendezvous = t.rendezvous();
  a.backend = t.backend();
  a.job_yaml = t.job_yaml();
  a.checkpoint_dir = t.checkpoint_dir();
  a.output_dir = t.output_dir();
  a.input_model = t.input_model();
  a.teacher_model = t.teacher_model();
  a.artifacts_dir = t.artifacts_dir();
  a.crash_report = t.crash_report();
  return std::optional<TaskAssignment>(std::move(a));
}

absl::StatusOr<bool> CoordinatorClient::Progress(const std::string& task_id, int64_t step,
                                                 double loss, double step_time_s,
                                                 double samples_per_s,
                                                 const std::vector<std::string>& log_lines) {
  sd::v1::ProgressRequest req;
  req.set_worker_id(impl_->id);
  req.set_task_id(task_id);
  req.set_step(step);
  req.set_loss(loss);
  req.set_step_time_s(step_time_s);
  req.set_samples_per_s(samples_per_s);
  for (const auto& l : log_lines) req.add_log_lines(l);
  sd::v1::ProgressResponse resp;
  grpc::ClientContext ctx;
  Deadline(ctx, 5);
  auto s = FromGrpc(impl_->stub->ReportProgress(&ctx, req, &resp), "progress");
  if (!s.ok()) return s;
  return resp.abort();
}

absl::Status CoordinatorClient::Finish(const std::string& task_id, const absl::Status& result,
                                       const std::vector<std::string>& log_lines) {
  sd::v1::FinishRequest req;
  req.set_worker_id(impl_->id);
  req.set_task_id(task_id);
  req.set_ok(result.ok());
  req.set_error(std::string(result.message()));
  req.set_code(static_cast<int32_t>(result.code()));
  for (const auto& l : log_lines) req.add_log_lines(l);
  sd::v1::FinishResponse resp;
  grpc::ClientContext ctx;
  Deadline(ctx, 10);
  return FromGrpc(impl_->stub->Finish(&ctx, req, &resp), "finish");
}

}  // namespace sd::worker
