#pragma once
// sdserve's HTTP front end. Generation follows OpenAI's Images API, so clients
// that already speak it (the official `openai` Python client among them) work
// unchanged:
//   POST /v1/images/generations  {prompt, n, size "WxH", response_format "b64_json",
//                                 model} -> {created, data: [{b64_json}]}
// plus sdcompress fields the API lacks (negative_prompt, steps, guidance_scale,
// seed, scheduler, timeout) and `stream: true` for server-sent events (progress,
// then each image). Errors are OpenAI's {"error": {message, type, param, code}}:
// 400 naming the field, 404 for another model, 429 with Retry-After when the
// queue is full. Also: GET / (a web page), /v1/models, /metrics, /healthz, /readyz.
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "serve/job.h"

namespace httplib {
class Server;
}

namespace sd::serve {

class HttpApi {
 public:
  // port 0 picks a free port; port() tells which.
  static absl::StatusOr<std::unique_ptr<HttpApi>> Start(ImageService* service,
                                                        metrics::Registry* registry,
                                                        const std::string& host, int port);
  ~HttpApi();
  int port() const { return port_; }

 private:
  HttpApi() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

// The web page served at / (serve/web/index.html, embedded at build time).
extern const char kWebPage[];

}  // namespace sd::serve
