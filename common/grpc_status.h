#pragma once
// absl::Status <-> grpc::Status for the gRPC services (same code, same message).
#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace sd {

grpc::Status ToGrpc(const absl::Status& s);

}  // namespace sd
