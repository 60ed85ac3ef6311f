#include "serve/grpc_service.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"

namespace sd::serve {

grpc::Status GenerationServiceImpl::Generate(grpc::ServerContext* ctx,
                                             const sd::v1::GenerateRequest* req,
                                             grpc::ServerWriter<sd::v1::GenerateResponse>* out) {
  GenerationRequest r;
  r.prompt = req->prompt();
  r.negative_prompt = req->negative_prompt();
  r.n = req->n() == 0 ? 1 : req->n();
  r.width = req->width();
  r.height = req->height();
  r.steps = req->steps();
  if (req->has_guidance_scale()) r.guidance_scale = req->guidance_scale();
  r.seed = req->seed();
  r.scheduler = req->scheduler();
  const auto left = ctx->deadline() - std::chrono::system_clock::now();
  // No deadline reads as the far future; the server's --request-timeout applies then.
  if (left < std::chrono::hours(24))
    r.timeout_s = std::max(1e-3, std::chrono::duration<double>(left).count());
  auto job = service_->Submit(r);
  if (!job.ok()) {
    grpc::Status s = ToGrpc(job.status());
    if (job.status().code() == absl::StatusCode::kResourceExhausted)
      ctx->AddTrailingMetadata("retry-after", std::to_string(service_->retry_after_s()));
    return s;
  }
  Job::Snapshot s;
  int64_t sent_step = -1;
  while (!(s = (*job)->WaitChange(s.version, 0.1)).done) {
    if (ctx->IsCancelled()) {
      (*job)->Cancel();
      continue;
    }
    if (s.step != sent_step && s.total > 0) {
      sent_step = s.step;
      sd::v1::GenerateResponse ev;
      ev.mutable_progress()->set_step(static_cast<int32_t>(s.step));
      ev.mutable_progress()->set_total(static_cast<int32_t>(s.total));
      ev.mutable_progress()->set_queue_seconds(s.queue_s);
      if (!out->Write(ev)) (*job)->Cancel();
    }
  }
  if (!s.status.ok()) return ToGrpc(s.status);
  auto pngs = s.pngs();
  if (!pngs.ok()) return ToGrpc(pngs.status());
  const GenerationRequest& q = (*job)->request();
  for (size_t i = 0; i < pngs->size(); ++i) {
    sd::v1::GenerateResponse ev;
    auto* img = ev.mutable_image();
    img->set_index(static_cast<int32_t>(i));
    img->set_png(std::move((*pngs)[i]));
    img->set_width(static_cast<int32_t>(q.width));
    img->set_height(static_cast<int32_t>(q.height));
    if (!out->Write(ev)) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
  }
  return grpc::Status::OK;
}

grpc::Status GenerationServiceImpl::Health(grpc::ServerContext*, const sd::v1::ServerHealthRequest*,
                                           sd::v1::ServerHealthResponse* out) {
  const ServiceHealth h = service_->health();
  out->set_ready(h.ready);
  out->set_model(service_->model_name());
  out->set_batching(service_->batching());
  out->set_queue_depth(static_cast<int32_t>(h.queue_depth));
  out->set_running(static_cast<int32_t>(h.running_images));
  return grpc::Status::OK;
}

struct GrpcFrontEnd::Impl {
  explicit Impl(ImageService* s) : service(s) {}
  GenerationServiceImpl service;
  std::unique_ptr<grpc::Server> server;
};

absl::StatusOr<std::unique_ptr<GrpcFrontEnd>> GrpcFrontEnd::Start(ImageService* service,
                                                                  const std::string& listen) {
  std::unique_ptr<GrpcFrontEnd> f(new GrpcFrontEnd());
  f->impl_ = std::make_unique<Impl>(service);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&f->impl_->service);
  f->impl_->server = builder.BuildAndStart();
  if (!f->impl_->server || port == 0)
    return absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ", listen));
  f->address_ = absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
  return f;
}

void GrpcFrontEnd::Shutdown(double grace_s) {
  if (impl_ && impl_->server)
    impl_->server->Shutdown(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
}

GrpcFrontEnd::~GrpcFrontEnd() { Shutdown(0); }

}  // namespace sd::serve
