#pragma once
// Starts sdserve's gRPC server without its headers (see grpc_service.h for why).
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "serve/job.h"

namespace sd::serve {

class GrpcFrontEnd {
 public:
  // listen "host:port" (port 0: any free one). Serves sd.v1.GenerationService and
  // the standard grpc.health.v1 service.
  static absl::StatusOr<std::unique_ptr<GrpcFrontEnd>> Start(ImageService* service,
                                                             const std::string& listen);
  ~GrpcFrontEnd();
  GrpcFrontEnd(const GrpcFrontEnd&) = delete;
  GrpcFrontEnd& operator=(const GrpcFrontEnd&) = delete;
  // host:port actually bound.
  const std::string& address() const { return address_; }
  // Waits up to `grace_s` for calls in flight, then cancels them.
  void Shutdown(double grace_s);

 private:
  struct Impl;
  GrpcFrontEnd() = default;
  std::unique_ptr<Impl> impl_;
  std::string address_;
};

}  // namespace sd::serve
