#pragma once
// sdserve's gRPC front end (sd.v1.GenerationService); policy stays in the service
// behind it. Includes protobuf and gRPC: never include this beside LibTorch
// (main.cc starts it through GrpcFrontEnd).
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "sd/v1/generation.grpc.pb.h"
#include "serve/grpc_front_end.h"
#include "serve/job.h"

namespace sd::serve {

class GenerationServiceImpl final : public sd::v1::GenerationService::Service {
 public:
  explicit GenerationServiceImpl(ImageService* service) : service_(service) {}
  // Streams progress, then the images. The call's deadline is the request's; a
  // cancelled call frees its slot at the next step boundary.
  grpc::Status Generate(grpc::ServerContext* ctx, const sd::v1::GenerateRequest* req,
                        grpc::ServerWriter<sd::v1::GenerateResponse>* out) override;
  grpc::Status Health(grpc::ServerContext* ctx, const sd::v1::ServerHealthRequest* req,
                      sd::v1::ServerHealthResponse* out) override;

 private:
  ImageService* service_;
};

}  // namespace sd::serve
