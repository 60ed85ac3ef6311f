#include "common/http_exporter.h"

#include <httplib.h>

#include "absl/strings/str_cat.h"

namespace sd::metrics {

void AddMetricsRoutes(httplib::Server& server, Registry* registry) {
  server.Get("/metrics", [registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
}

absl::StatusOr<std::unique_ptr<HttpExporter>> HttpExporter::Start(Registry* registry,
                                                                  const std::string& host,
                                                                  int port) {
  std::unique_ptr<HttpExporter> e(new HttpExporter());
  e->server_ = std::make_unique<httplib::Server>();
  AddMetricsRoutes(*e->server_, registry);
  if (port == 0) {
    e->port_ = e->server_->bind_to_any_port(host.c_str());
  } else {
    e->port_ = e->server_->bind_to_port(host.c_str(), port) ? port : -1;
  }
  if (e->port_ <= 0)
    return absl::UnavailableError(absl::StrCat("cannot listen for /metrics on ", host, ":", port));
  httplib::Server* s = e->server_.get();
  e->thread_ = std::thread([s] { s->listen_after_bind(); });
  return e;
}

HttpExporter::~HttpExporter() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace sd::metrics
