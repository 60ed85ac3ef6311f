#include "coordinator/grpc_services.h"

#include "stages/catalog.h"

#include <chrono>
#include <cstdlib>
#include <thread>

namespace sd::coord {

namespace {
// Events are stored as "<unix time> <text>"; a worker's lines read "<id>: ...".
double EventTime(const std::string& event) { return std::strtod(event.c_str(), nullptr); }
}  // namespace

void ToProto(const JobRecord& j, sd::v1::Job* out) {
  out->set_job_id(j.id);
  if (!j.events.empty()) {
    out->set_submitted_at(EventTime(j.events.front()));
    out->set_updated_at(EventTime(j.events.back()));
  }
  out->set_name(j.spec.name);
  out->set_state(static_cast<sd::v1::JobState>(static_cast<int>(j.state) + 1));
  for (const auto& st : j.stages) {
    auto* s = out->add_stages();
    s->set_name(st.spec.name);
    s->set_state(static_cast<sd::v1::StageState>(static_cast<int>(st.state) + 1));
    s->set_step(st.step);
    s->set_total_steps(StageTotalSteps(j.spec, st.spec.name));
    s->set_loss(st.loss);
    s->set_restarts(st.restarts);
    s->set_world_size(static_cast<int32_t>(st.spec.workers));
  }
}

grpc::Status JobServiceImpl::SubmitJob(grpc::ServerContext*, const sd::v1::SubmitJobRequest* req,
                                       sd::v1::SubmitJobResponse* resp) {
  auto id =
      core_->Submit(req->job_yaml(), req->origin().empty() ? "job.yaml" : req->origin(), now_());
  if (!id.ok()) return ToGrpc(id.status());
  resp->set_job_id(*id);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext*, const sd::v1::GetJobRequest* req,
                                    sd::v1::Job* resp) {
  auto j = core_->GetJob(req->job_id());
  if (!j.ok()) return ToGrpc(j.status());
  ToProto(*j, resp);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext*, const sd::v1::ListJobsRequest*,
                                      sd::v1::ListJobsResponse* resp) {
  for (const auto& j : core_->ListJobs()) ToProto(j, resp->add_jobs());
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext*, const sd::v1::CancelJobRequest* req,
                                       sd::v1::CancelJobResponse*) {
  return ToGrpc(core_->Cancel(req->job_id(), now_()));
}

grpc::Status JobServiceImpl::ResumeJob(grpc::ServerContext*, const sd::v1::ResumeJobRequest* req,
                                       sd::v1::ResumeJobResponse*) {
  return ToGrpc(core_->Resume(req->job_id(), now_()));
}

grpc::Status JobServiceImpl::StreamEvents(grpc::ServerContext* ctx,
                                          const sd::v1::StreamEventsRequest* req,
                                          grpc::ServerWriter<sd::v1::JobEvent>* writer) {
  int64_t next = req->after_seq();
  while (!ctx->IsCancelled()) {
    auto j = core_->GetJob(req->job_id());
    if (!j.ok()) return ToGrpc(j.status());
    for (; next < static_cast<int64_t>(j->events.size()); ++next) {
      sd::v1::JobEvent ev;
      const std::string& e = j->events[next];
      ev.set_seq(next + 1);
      ev.set_time(EventTime(e));
      // "<time> <worker>: <line>" for what a worker reported: its first word ends
      // in a colon, which no event of the coordinator's own does.
      const size_t space = e.find(' ');
      const size_t word_end = space == std::string::npos ? space : e.find(' ', space + 1);
      const bool from_worker = word_end != std::string::npos && e[word_end - 1] == ':';
      ev.set_source(from_worker ? e.substr(space + 1, word_end - space - 2) : "coordinator");
      ev.set_text(e);
      ToProto(*j, ev.mutable_job());
      if (!writer->Write(ev)) return grpc::Status::OK;
    }
    const bool ended = Ended(j->state);
    if (!req->follow() || ended) return grpc::Status::OK;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListWorkers(grpc::ServerContext*, const sd::v1::ListWorkersRequest*,
                                         sd::v1::ListWorkersResponse* resp) {
  const double now = now_();
  for (const auto& w : core_->ListWorkers()) {
    auto* o = resp->add_workers();
    o->set_worker_id(w.id);
    o->set_device(w.device);
    o->set_device_count(static_cast<int32_t>(w.device_count));
    o->set_memory_bytes(w.memory_bytes);
    o->set_task_id(w.task);
    o->set_heartbeat_age_s(now - w.last_heartbeat);
    o->set_alive(w.alive);
    o->set_metrics_address(w.metrics_address);
  }
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::Register(grpc::ServerContext*, const sd::v1::RegisterRequest* req,
                                         sd::v1::RegisterResponse* resp) {
  if (req->worker_id().empty())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "worker_id is empty");
  core_->Register(req->worker_id(), req->resources().device(), req->resources().device_count(),
                  req->resources().memory_bytes(), req->metrics_address(), req->running_task_id(),
                  req->running_rank(), now_());
  resp->set_heartbeat_interval_s(heartbeat_interval_s_);
  resp->set_lease_s(lease_s_);
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext*, const sd::v1::HeartbeatRequest* req,
                                          sd::v1::HeartbeatResponse* resp) {
  auto abort = core_->Heartbeat(req->worker_id(), now_());
  if (!abort.ok()) return ToGrpc(abort.status());
  resp->set_abort_task_id(*abort);
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::PollTask(grpc::ServerContext*, const sd::v1::PollTaskRequest* req,
                                         sd::v1::PollTaskResponse* resp) {
  auto t = core_->Poll(req->worker_id());
  if (!t.has_value()) return grpc::Status::OK;
  auto* task = resp->mutable_task();
  task->set_task_id(t->task_id);
  task->set_job_id(t->job_id);
  task->set_stage(t->stage);
  task->set_rank(static_cast<int32_t>(t->rank));
  task->set_world_size(static_cast<int32_t>(t->world_size));
  task->set_rendezvous(t->rendezvous);
  task->set_backend(t->backend);
  task->set_job_yaml(t->job_yaml);
  task->set_checkpoint_dir(t->checkpoint_dir);
  task->set_output_dir(t->output_dir);
  task->set_input_model(t->input_model);
  task->set_teacher_model(t->teacher_model);
  task->set_artifacts_dir(t->artifacts_dir);
  task->set_crash_report(t->crash_report);
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::ReportProgress(grpc::ServerContext*,
                                               const sd::v1::ProgressRequest* req,
                                               sd::v1::ProgressResponse* resp) {
  auto abort = core_->Progress(req->worker_id(), req->task_id(), req->step(), req->loss(),
                               req->step_time_s(), req->samples_per_s(),
                               {req->log_lines().begin(), req->log_lines().end()}, now_());
  if (!abort.ok()) return ToGrpc(abort.status());
  resp->set_abort(*abort);
  return grpc::Status::OK;
}

grpc::Status WorkerServiceImpl::Finish(grpc::ServerContext*, const sd::v1::FinishRequest* req,
                                       sd::v1::FinishResponse*) {
  return ToGrpc(core_->Finish(req->worker_id(), req->task_id(), req->ok(), req->error(),
                              static_cast<absl::StatusCode>(req->code()),
                              {req->log_lines().begin(), req->log_lines().end()}, now_()));
}

}  // namespace sd::coord
