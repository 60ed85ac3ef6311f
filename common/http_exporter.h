#pragma once
// Serves a metrics Registry at http://host:port/metrics on a background thread.
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/metrics.h"

namespace httplib {
class Server;
}

namespace sd::metrics {

// GET /metrics (the registry, text format 0.0.4) and GET /healthz on `server`:
// the routes every daemon's HTTP server has.
void AddMetricsRoutes(httplib::Server& server, Registry* registry);

class HttpExporter {
 public:
  // port 0 picks a free port; port() tells which.
  static absl::StatusOr<std::unique_ptr<HttpExporter>> Start(Registry* registry,
                                                             const std::string& host, int port);
  ~HttpExporter();
  int port() const { return port_; }

 private:
  HttpExporter() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace sd::metrics
