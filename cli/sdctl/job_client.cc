#include "cli/sdctl/job_client.h"

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "sd/v1/jobs.grpc.pb.h"

namespace sdctl {
namespace {

absl::Status FromGrpc(const grpc::Status& s, const std::string& address) {
  if (s.ok()) return absl::OkStatus();
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return absl::UnavailableError(absl::StrCat(
        "no coordinator at ", address, " (", s.error_message(), "); is the coordinator running?"));
  }
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// "JOB_STATE_RUNNING" -> "RUNNING", from the generated enum descriptors.
std::string StateName(const std::string& full, const std::string& prefix) {
  return full.rfind(prefix, 0) == 0 ? full.substr(prefix.size()) : full;
}

JobView View(const sd::v1::Job& j) {
  JobView v{j.job_id(), j.name(), StateName(sd::v1::JobState_Name(j.state()), "JOB_STATE_"), {}};
  for (const auto& s : j.stages()) {
    StageView st;
    st.name = s.name();
    st.state = StateName(sd::v1::StageState_Name(s.state()), "STAGE_STATE_");
    st.step = s.step();
    st.total_steps = s.total_steps();
    st.restarts = s.restarts();
    st.world_size = s.world_size();
    st.loss = s.loss();
    v.stages.push_back(st);
  }
  return v;
}

}  // namespace

struct JobClient::Impl {
  std::string address;
  std::unique_ptr<sd::v1::JobService::Stub> stub;
};

JobClient::JobClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
JobClient::~JobClient() = default;

std::unique_ptr<JobClient> JobClient::Connect(const std::string& address) {
  auto impl = std::make_unique<Impl>();
  impl->address = address;
  impl->stub =
      sd::v1::JobService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  return std::unique_ptr<JobClient>(new JobClient(std::move(impl)));
}

absl::StatusOr<std::string> JobClient::Submit(const std::string& yaml, const std::string& origin) {
  sd::v1::SubmitJobRequest req;
  req.set_job_yaml(yaml);
  req.set_origin(origin);
  sd::v1::SubmitJobResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto s = FromGrpc(impl_->stub->SubmitJob(&ctx, req, &resp), impl_->address);
  if (!s.ok()) return s;
  return resp.job_id();
}

absl::StatusOr<JobView> JobClient::Get(const std::string& id) {
  sd::v1::GetJobRequest req;
  req.set_job_id(id);
  sd::v1::Job resp;
  grpc::ClientContext ctx;
  auto s = FromGrpc(impl_->stub->GetJob(&ctx, req, &resp), impl_->address);
  if (!s.ok()) return s;
  return View(resp);
}

absl::StatusOr<std::vector<JobView>> JobClient::List() {
  sd::v1::ListJobsRequest req;
  sd::v1::ListJobsResponse resp;
  grpc::ClientContext ctx;
  auto s = FromGrpc(impl_->stub->ListJobs(&ctx, req, &resp), impl_->address);
  if (!s.ok()) return s;
  std::vector<JobView> out;
  for (const auto& j : resp.jobs()) out.push_back(View(j));
  return out;
}

absl::Status JobClient::Cancel(const std::string& id) {
  sd::v1::CancelJobRequest req;
  req.set_job_id(id);
  sd::v1::CancelJobResponse resp;
  grpc::ClientContext ctx;
  return FromGrpc(impl_->stub->CancelJob(&ctx, req, &resp), impl_->address);
}

absl::Status JobClient::Resume(const std::string& id) {
  sd::v1::ResumeJobRequest req;
  req.set_job_id(id);
  sd::v1::ResumeJobResponse resp;
  grpc::ClientContext ctx;
  return FromGrpc(impl_->stub->ResumeJob(&ctx, req, &resp), impl_->address);
}

absl::StatusOr<std::vector<WorkerView>> JobClient::Workers() {
  sd::v1::ListWorkersRequest req;
  sd::v1::ListWorkersResponse resp;
  grpc::ClientContext ctx;
  auto s = FromGrpc(impl_->stub->ListWorkers(&ctx, req, &resp), impl_->address);
  if (!s.ok()) return s;
  std::vector<WorkerView> out;
  for (const auto& w : resp.workers()) {
    out.push_back({w.worker_id(), w.device(), w.task_id(), w.device_count(), w.memory_bytes(),
                   w.heartbeat_age_s(), w.alive(), w.metrics_address()});
  }
  return out;
}

absl::Status JobClient::Events(
    const std::string& id, int64_t after, bool follow,
    const std::function<void(int64_t, const std::string&, const JobView&)>& on_event) {
  sd::v1::StreamEventsRequest req;
  req.set_job_id(id);
  req.set_after_seq(after);
  req.set_follow(follow);
  grpc::ClientContext ctx;
  auto reader = impl_->stub->StreamEvents(&ctx, req);
  sd::v1::JobEvent ev;
  while (reader->Read(&ev)) on_event(ev.seq(), ev.text(), View(ev.job()));
  return FromGrpc(reader->Finish(), impl_->address);
}

}  // namespace sdctl
