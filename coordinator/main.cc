// coordinator: schedules job stages onto registered workers (gRPC sd.v1),
// keeps job state in SQLite, exposes Prometheus metrics.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/args.h"
#include "common/http_exporter.h"
#include "coordinator/grpc_services.h"
#include "coordinator/storage_lock.h"
#include "sd/util/status_macros.h"

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

double Now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(sd::Args a,
                   sd::Args::Parse(argc, argv,
                                   {"listen", "store", "storage", "metrics-port", "metrics-host",
                                    "heartbeat-timeout", "rendezvous-host", "rendezvous-base-port",
                                    "restart-backoff", "restart-backoff-max"}));
  const std::string listen = a.Get("listen", "127.0.0.1:50051");
  const std::string storage = a.Get("storage", "output/runs");
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  // Held until the process exits: before the store is opened, so two
  // coordinators never share one.
  ASSIGN_OR_RETURN(
      auto lock,
      sd::coord::StorageLock::Acquire(
          storage, absl::StrCat("pid ", ::getpid(), " on ", host, ", listening on ", listen,
                                ", started at unix time ", static_cast<int64_t>(Now()))));
  ASSIGN_OR_RETURN(auto store, sd::coord::JobStore::Open(a.Get("store", storage + "/jobs.db")));
  sd::coord::JobSchedulerOptions opts;
  ASSIGN_OR_RETURN(opts.heartbeat_timeout_s, a.Double("heartbeat-timeout", 10));
  ASSIGN_OR_RETURN(opts.restart_backoff_s, a.Double("restart-backoff", 2));
  ASSIGN_OR_RETURN(opts.restart_backoff_max_s, a.Double("restart-backoff-max", 300));
  opts.rendezvous_host = a.Get("rendezvous-host", "127.0.0.1");
  ASSIGN_OR_RETURN(opts.rendezvous_base_port, a.Int("rendezvous-base-port", 29500));
  sd::metrics::Registry registry;
  sd::coord::CoordinatorCore core(opts, std::move(store), storage, &registry);
  RETURN_IF_ERROR(core.Recover(Now()));
  ASSIGN_OR_RETURN(int64_t metrics_port, a.Int("metrics-port", 9400));
  ASSIGN_OR_RETURN(auto exporter,
                   sd::metrics::HttpExporter::Start(&registry, a.Get("metrics-host", "127.0.0.1"),
                                                    static_cast<int>(metrics_port)));

  sd::coord::JobServiceImpl jobs(&core, Now);
  // Heartbeats four times per timeout; a worker cut off for 3/4 of it stops its
  // task itself, before the coordinator can hand the stage to someone else.
  sd::coord::WorkerServiceImpl workers(&core, Now, std::max(0.5, opts.heartbeat_timeout_s / 4),
                                       opts.heartbeat_timeout_s * 0.75);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&jobs);
  builder.RegisterService(&workers);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) return absl::UnavailableError("cannot listen on " + listen);
  std::cout << "coordinator listening on " << listen << " (metrics on :" << exporter->port() << ")"
            << std::endl;

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) {
    core.Tick(Now());
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::Status s = Run(argc - 1, argv + 1);
  if (!s.ok()) {
    std::cerr << "coordinator: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
