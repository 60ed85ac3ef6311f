#include "serve/http_api.h"

#include <dirent.h>
#include <httplib.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/http_exporter.h"

namespace sd::serve {
namespace {

using nlohmann::json;

// ---- noticing a client that went away ----
//
// httplib 0.11 (Debian 12) gives a handler no access to its connection, and its
// is_writable() only asks whether the socket buffer has room, which stays true
// after the peer closed. We find the connection's socket by its peer address
// (unique among this process's sockets while the handler runs, since httplib
// closes it only after the handler returns) and poll it for a hang-up.
int FindPeerSocket(const std::string& addr, int port) {
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  int found = -1;
  while (dirent* e = ::readdir(d)) {
    int fd = 0;
    if (!absl::SimpleAtoi(e->d_name, &fd)) continue;
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) continue;
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    if (::getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, host, sizeof(host), serv, sizeof(serv),
                      NI_NUMERICHOST | NI_NUMERICSERV) != 0)
      continue;
    if (addr == host && std::atoi(serv) == port) {
      found = fd;
      break;
    }
  }
  ::closedir(d);
  return found;
}

bool PeerClosed(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// ---- OpenAI's error shape ----

void SendError(httplib::Response& res, int http, const std::string& message,
               const std::string& type, const std::string& param = "",
               const std::string& code = "") {
  json err = {{"message", message},
              {"type", type},
              {"param", param.empty() ? json(nullptr) : json(param)},
              {"code", code.empty() ? json(nullptr) : json(code)}};
  res.status = http;
  res.set_content(json{{"error", err}}.dump(), "application/json");
}

void SendStatus(httplib::Response& res, const absl::Status& s, ImageService* service) {
  const std::string msg(s.message());
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
      return SendError(res, 400, msg, "invalid_request_error", ErrorField(s));
    case absl::StatusCode::kResourceExhausted:
      res.set_header("Retry-After", std::to_string(service->retry_after_s()));
      return SendError(res, 429, msg, "rate_limit_error", "", "queue_full");
    case absl::StatusCode::kDeadlineExceeded:
      return SendError(res, 504, msg, "timeout");
    case absl::StatusCode::kUnavailable:
      return SendError(res, 503, msg, "server_error");
    case absl::StatusCode::kCancelled:
      // Nobody is listening; a status for the access log.
      return SendError(res, 499, msg, "cancelled");
    default:
      return SendError(res, 500, msg, "server_error");
  }
}

struct ParsedRequest {
  GenerationRequest gen;
  bool stream = false;
};

absl::StatusOr<ParsedRequest> ParseImagesRequest(const json& j) {
  if (!j.is_object()) return FieldError("body", "must be a JSON object");
  ParsedRequest p;
  const auto str = [&](const char* key, std::string* out) -> absl::Status {
    if (!j.contains(key) || j[key].is_null()) return absl::OkStatus();
    if (!j[key].is_string()) return FieldError(key, "must be a string");
    *out = j[key].get<std::string>();
    return absl::OkStatus();
  };
  const auto integer = [&](const char* key, int64_t* out) -> absl::Status {
    if (!j.contains(key) || j[key].is_null()) return absl::OkStatus();
    if (!j[key].is_number_integer()) return FieldError(key, "must be an integer");
    *out = j[key].get<int64_t>();
    return absl::OkStatus();
  };
  if (!j.contains("prompt") || !j["prompt"].is_string())
    return FieldError("prompt", "required, a string");
  p.gen.prompt = j["prompt"].get<std::string>();
  std::string model;
  if (absl::Status s = str("model", &model); !s.ok()) return s;
  if (absl::Status s = integer("n", &p.gen.n); !s.ok()) return s;
  std::string size;
  if (absl::Status s = str("size", &size); !s.ok()) return s;
  if (!size.empty() && size != "auto") {
    std::vector<std::string> wh = absl::StrSplit(size, 'x');
    if (wh.size() != 2 || !absl::SimpleAtoi(wh[0], &p.gen.width) ||
        !absl::SimpleAtoi(wh[1], &p.gen.height) || p.gen.width <= 0 || p.gen.height <= 0)
      return FieldError(
          "size", absl::StrCat("must be \"WIDTHxHEIGHT\" (e.g. 512x512), got \"", size, "\""));
  }
  std::string format;
  if (absl::Status s = str("response_format", &format); !s.ok()) return s;
  if (!format.empty() && format != "b64_json")
    return FieldError(
        "response_format",
        absl::StrCat("only b64_json is served (images come inline), got \"", format, "\""));
  std::string output_format;
  if (absl::Status s = str("output_format", &output_format); !s.ok()) return s;
  if (!output_format.empty() && output_format != "png")
    return FieldError("output_format",
                      absl::StrCat("only png is served, got \"", output_format, "\""));
  if (absl::Status s = str("negative_prompt", &p.gen.negative_prompt); !s.ok()) return s;
  if (absl::Status s = integer("steps", &p.gen.steps); !s.ok()) return s;
  if (p.gen.steps < 0) return FieldError("steps", "must be >= 1");
  int64_t seed = 0;
  if (absl::Status s = integer("seed", &seed); !s.ok()) return s;
  if (seed < 0) return FieldError("seed", absl::StrCat("must be >= 0, got ", seed));
  p.gen.seed = static_cast<uint64_t>(seed);
  if (j.contains("guidance_scale") && !j["guidance_scale"].is_null()) {
    if (!j["guidance_scale"].is_number()) return FieldError("guidance_scale", "must be a number");
    p.gen.guidance_scale = j["guidance_scale"].get<double>();
  }
  if (absl::Status s = str("scheduler", &p.gen.scheduler); !s.ok()) return s;
  if (j.contains("timeout") && !j["timeout"].is_null()) {
    if (!j["timeout"].is_number() || !(j["timeout"].get<double>() > 0))
      return FieldError("timeout", "must be a number of seconds > 0");
    p.gen.timeout_s = j["timeout"].get<double>();
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) return FieldError("stream", "must be true or false");
    p.stream = j["stream"].get<bool>();
  }
  return p;
}

absl::StatusOr<std::vector<std::string>> EncodeImages(const Job::Snapshot& s) {
  auto pngs = s.pngs();
  if (!pngs.ok()) return pngs.status();
  for (auto& p : *pngs) p = absl::Base64Escape(p);
  return pngs;
}

std::string SseEvent(const std::string& type, json data) {
  data["type"] = type;
  return absl::StrCat("event: ", type, "\ndata: ", data.dump(), "\n\n");
}

int64_t UnixNow() { return static_cast<int64_t>(std::time(nullptr)); }

void HandleGenerate(ImageService* service, metrics::Registry* registry, const httplib::Request& req,
                    httplib::Response& res) {
  // Refusals here never reach the service; count them as it counts its own.
  const auto refused = [registry] {
    registry->CounterAdd("sdserve_rejected_requests_total",
                         "Requests refused before they queued, by reason", {{"reason", "invalid"}});
  };
  json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    refused();
    return SendError(res, 400, "the body is not valid JSON", "invalid_request_error");
  }
  auto parsed = ParseImagesRequest(body);
  if (!parsed.ok()) {
    refused();
    return SendStatus(res, parsed.status(), service);
  }
  const std::string served = service->model_name();
  if (body.contains("model") && !body["model"].is_null() && body["model"] != served) {
    refused();
    return SendError(res, 404,
                     absl::StrCat("model ", body["model"].dump(),
                                  " is not served here; this server serves \"", served, "\""),
                     "invalid_request_error", "model", "model_not_found");
  }
  auto job = service->Submit(parsed->gen);
  if (!job.ok()) return SendStatus(res, job.status(), service);
  const int fd = FindPeerSocket(req.remote_addr, req.remote_port);
  const GenerationRequest& r = (*job)->request();
  const std::string size = absl::StrCat(r.width, "x", r.height);

  if (!parsed->stream) {
    Job::Snapshot s;
    while (!(s = (*job)->WaitChange(s.version, 0.1)).done) {
      if (PeerClosed(fd)) (*job)->Cancel();
    }
    if (!s.status.ok()) return SendStatus(res, s.status, service);
    auto b64 = EncodeImages(s);
    if (!b64.ok()) return SendStatus(res, b64.status(), service);
    json data = json::array();
    for (auto& b : *b64) data.push_back({{"b64_json", std::move(b)}});
    json out = {{"created", UnixNow()},
                {"data", std::move(data)},
                {"output_format", "png"},
                {"size", size},
                {"sdcompress",
                 {{"steps", r.steps},
                  {"seed", r.seed},
                  {"guidance_scale", *r.guidance_scale},
                  {"queue_seconds", s.queue_s}}}};
    res.set_content(out.dump(), "application/json");
    return;
  }

  // Server-sent events: progress while it denoises, then each image; an error
  // after the stream began comes as an "error" event.
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream", [job = *job, fd, size](size_t, httplib::DataSink& sink) {
        Job::Snapshot s;
        int64_t sent_step = -1;
        for (;;) {
          s = job->WaitChange(s.version, 0.1);
          if (PeerClosed(fd)) {
            job->Cancel();
            return false;
          }
          if (s.step != sent_step && s.total > 0 && !s.done) {
            sent_step = s.step;
            const std::string ev =
                SseEvent("image_generation.progress",
                         {{"step", s.step}, {"total", s.total}, {"queue_seconds", s.queue_s}});
            if (!sink.write(ev.data(), ev.size())) {
              job->Cancel();
              return false;
            }
          }
          if (s.done) break;
        }
        std::string out;
        if (!s.status.ok()) {
          out = SseEvent("error", {{"error",
                                    {{"message", std::string(s.status.message())},
                                     {"code", absl::StatusCodeToString(s.status.code())}}}});
        } else if (auto b64 = EncodeImages(s); !b64.ok()) {
          out = SseEvent("error", {{"error", {{"message", std::string(b64.status().message())}}}});
        } else {
          for (size_t i = 0; i < b64->size(); ++i)
            out += SseEvent("image_generation.completed", {{"b64_json", std::move((*b64)[i])},
                                                           {"image_index", i},
                                                           {"created_at", UnixNow()},
                                                           {"size", size},
                                                           {"output_format", "png"}});
        }
        sink.write(out.data(), out.size());
        sink.done();
        return true;
      });
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpApi>> HttpApi::Start(ImageService* service,
                                                        metrics::Registry* registry,
                                                        const std::string& host, int port) {
  std::unique_ptr<HttpApi> api(new HttpApi());
  api->server_ = std::make_unique<httplib::Server>();
  httplib::Server& s = *api->server_;
  // A thread for every request the engine may hold (queued or running) plus a
  // few for health and metrics, so a request past the queue gets its 429 at
  // once instead of waiting in httplib's own unbounded task queue.
  const size_t threads = static_cast<size_t>(service->capacity() + 8);
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_payload_max_length(1 << 20);
  s.Post("/v1/images/generations",
         [service, registry](const httplib::Request& req, httplib::Response& res) {
           HandleGenerate(service, registry, req, res);
         });
  s.Get("/v1/models", [service](const httplib::Request&, httplib::Response& res) {
    json m = {{"id", service->model_name()},
              {"object", "model"},
              {"created", 0},
              {"owned_by", "sdcompress"}};
    res.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(),
                    "application/json");
  });
  s.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kWebPage, "text/html; charset=utf-8");
  });
  metrics::AddMetricsRoutes(s, registry);
  s.Get("/readyz", [service](const httplib::Request&, httplib::Response& res) {
    const ServiceHealth h = service->health();
    res.status = h.ready ? 200 : 503;
    res.set_content(json{{"ready", h.ready},
                         {"model", service->model_name()},
                         {"batching", service->batching()},
                         {"queue_depth", h.queue_depth},
                         {"running_images", h.running_images}}
                        .dump(),
                    "application/json");
  });
  if (port == 0) {
    api->port_ = s.bind_to_any_port(host.c_str());
  } else {
    api->port_ = s.bind_to_port(host.c_str(), port) ? port : -1;
  }
  if (api->port_ <= 0)
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", host, ":", port));
  api->thread_ = std::thread([&s] { s.listen_after_bind(); });
  return api;
}

HttpApi::~HttpApi() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace sd::serve
