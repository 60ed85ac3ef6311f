// worker: registers with the coordinator, heartbeats, runs the stage tasks it is
// given (joining the stage's c10d group), reports progress, finishes or fails.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/args.h"
#include "common/http_exporter.h"
#include "common/metrics.h"
#include "sd/util/status_macros.h"
#include "stages/catalog.h"
#include "stages/stage.h"
#include "worker/coordinator_client.h"
#include "worker/crash_report.h"
#include "worker/data_parallel.h"

namespace {

// Device memory of GPU 0 on CUDA machines, else physical RAM.
int64_t MemoryBytes() {
  if (torch::cuda::is_available()) {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) == cudaSuccess) return static_cast<int64_t>(total);
  }
  return static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) * ::sysconf(_SC_PAGESIZE);
}

class Worker {
 public:
  Worker(std::unique_ptr<sd::worker::CoordinatorClient> client, sd::metrics::Registry* metrics,
         std::string id, std::string metrics_address)
      : client_(std::move(client)),
        metrics_(metrics),
        id_(std::move(id)),
        metrics_address_(std::move(metrics_address)) {}

  sd::worker::WorkerDescription Describe() {
    std::lock_guard<std::mutex> lock(mu_);
    const bool cuda = torch::cuda::is_available();
    return {id_,           cuda ? "cuda" : "cpu",
            current_task_, cuda ? torch::cuda::device_count() : 1,
            MemoryBytes(), static_cast<int64_t>(std::thread::hardware_concurrency())};
  }

  // Says what this worker still runs, so a restarted coordinator adopts it (or
  // tells it to stop) instead of handing its stage to someone else as well.
  absl::Status Register() {
    const bool cuda = torch::cuda::is_available();
    std::string task;
    int64_t rank = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      task = current_task_;
      rank = current_rank_;
    }
    auto reg = client_->Register(cuda ? "cuda" : "cpu", cuda ? torch::cuda::device_count() : 1,
                                 std::thread::hardware_concurrency(), MemoryBytes(),
                                 metrics_address_, task, rank);
    if (!reg.ok()) return reg.status();
    interval_ = reg->heartbeat_interval_s;
    lease_s_ = reg->lease_s;
    Acked();
    return absl::OkStatus();
  }

  void HeartbeatLoop() {
    while (true) {
      auto abort = client_->Heartbeat();
      if (abort.ok()) {
        Acked();
        std::lock_guard<std::mutex> lock(mu_);
        if (!abort->empty() && *abort == current_task_) abort_ = true;
      } else if (abort.status().code() == absl::StatusCode::kNotFound) {
        Register().IgnoreError();  // the coordinator restarted or expired us
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(interval_.load()));
    }
  }

  absl::Status RunTask(const sd::TaskAssignment& task) {
    ASSIGN_OR_RETURN(sd::JobSpec job, sd::ParseJobSpec(task.job_yaml, task.job_id));
    ASSIGN_OR_RETURN(auto stage, sd::stages::MakeStage(task.stage));
    sd::stages::StageContext ctx = sd::stages::MakeStageContext(task, std::move(job));
    if (ctx.world_size > 1) {
      ASSIGN_OR_RETURN(ctx.collectives, sd::worker::DataParallelGroup::Join(
                                            task.rendezvous, ctx.rank, ctx.world_size,
                                            task.backend.empty() ? "gloo" : task.backend));
    }
    ctx.should_stop = [this](int64_t) { return ShouldStop(); };
    ctx.fenced = [this] { return ShouldStop(); };
    ctx.event = [&](sd::stages::StageEvent kind, const std::string& text) {
      const sd::metrics::Labels l{{"stage", task.stage}};
      if (kind == sd::stages::StageEvent::kCheckpointRejected)
        metrics_->CounterAdd("sd_checkpoints_rejected_total",
                             "Checkpoints found invalid and passed over on resume.", l);
      if (kind == sd::stages::StageEvent::kSampleSkipped)
        metrics_->CounterAdd("sd_samples_skipped_total",
                             "Dataset samples skipped (bad metadata, missing or bad images).", l);
      std::cout << task.task_id << ": " << text << std::endl;
      sd::worker::SetLastWords(text);
      std::lock_guard<std::mutex> lock(mu_);
      log_lines_.push_back(text);
    };
    ctx.report = [&](const sd::stages::StageProgress& p) {
      const sd::metrics::Labels l{{"worker", id_}, {"job_id", task.job_id}, {"stage", task.stage}};
      metrics_->GaugeSet("sd_worker_step", "Latest step this worker finished.", l,
                         static_cast<double>(p.step));
      metrics_->GaugeSet("sd_worker_loss", "Latest local loss.", l, p.loss);
      metrics_->GaugeSet("sd_worker_samples_per_second",
                         "Global samples per second seen by this rank.", l, p.samples_per_s);
      metrics_->HistogramObserve("sd_worker_step_seconds", "Step time on this worker.",
                                 {{"stage", task.stage}}, p.step_time_s);
      metrics_->CounterAdd(
          "sd_worker_data_wait_seconds_total",
          "Time training steps waited for their batch (0 while prefetch keeps up).",
          {{"stage", task.stage}}, p.data_wait_s);
      if (p.checkpointed) {
        metrics_->CounterAdd("sd_checkpoints_written_total", "Checkpoints written by this worker.",
                             {{"stage", task.stage}});
        metrics_->HistogramObserve("sd_checkpoint_seconds", "Checkpoint write time.",
                                   {{"stage", task.stage}}, p.checkpoint_seconds);
        metrics_->GaugeSet("sd_checkpoint_bytes", "Size of the latest checkpoint.",
                           {{"stage", task.stage}}, static_cast<double>(p.checkpoint_bytes));
      }
      if (torch::cuda::is_available()) {
        auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
        metrics_->GaugeSet("sd_gpu_memory_allocated_bytes", "GPU memory allocated by LibTorch.",
                           {{"worker", id_}},
                           static_cast<double>(stats.allocated_bytes[0].current));
      }
      sd::worker::SetLastWords(absl::StrCat("step ", p.step, "/", p.total_steps, " loss ", p.loss));
      std::vector<std::string> lines = TakeLogLines();
      auto abort =
          client_->Progress(task.task_id, p.step, p.loss, p.step_time_s, p.samples_per_s, lines);
      if (abort.ok()) {
        Acked();
        if (*abort) abort_ = true;
      } else {
        if (abort.status().code() == absl::StatusCode::kFailedPrecondition) {
          std::cout << task.task_id << ": " << abort.status().message() << std::endl;
          abort_ = true;  // superseded: another attempt owns the stage now
        }
        PutBackLogLines(std::move(lines));
      }
    };
    absl::Status result = stage->Run(ctx);
    // Per-task series end with the task.
    const sd::metrics::Labels l{{"worker", id_}, {"job_id", task.job_id}, {"stage", task.stage}};
    for (const char* g : {"sd_worker_step", "sd_worker_loss", "sd_worker_samples_per_second"})
      metrics_->Remove(g, l);
    return result;
  }

  void Loop() {
    std::thread(&Worker::HeartbeatLoop, this).detach();
    while (true) {
      auto task = client_->Poll();
      if (!task.ok() || !task->has_value()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        continue;
      }
      const sd::TaskAssignment& t = **task;
      {
        std::lock_guard<std::mutex> lock(mu_);
        current_task_ = t.task_id;
        current_rank_ = t.rank;
        abort_ = false;
        log_lines_.clear();
      }
      if (!t.crash_report.empty()) {
        // The handler cannot create folders; make the report's one now.
        std::error_code ec;
        std::filesystem::create_directories(std::filesystem::path(t.crash_report).parent_path(),
                                            ec);
      }
      sd::worker::SetCrashContext(t.task_id, t.crash_report);
      std::cout << "running " << t.task_id << " as rank " << t.rank << "/" << t.world_size
                << std::endl;
      absl::Status result;
      try {
        result = RunTask(t);
      } catch (const std::exception& e) {
        result = absl::InternalError(e.what());
      }
      std::cout << t.task_id << ": " << (result.ok() ? "done" : result.ToString()) << std::endl;
      Finish(t.task_id, result);
      sd::worker::SetCrashContext("", "");
      std::lock_guard<std::mutex> lock(mu_);
      current_task_.clear();
    }
  }

 private:
  // The outcome is retried until the coordinator acknowledges it (Finish is
  // idempotent per attempt): a lost Finish would leave the job RUNNING for ever.
  // Meanwhile this worker still says it runs the task, so a restarted
  // coordinator adopts it and takes the Finish.
  void Finish(const std::string& task, const absl::Status& result) {
    double wait = 0.2;
    for (int attempt = 1;; ++attempt) {
      const std::vector<std::string> lines = TakeLogLines();
      absl::Status s = client_->Finish(task, result, lines);
      if (s.ok()) return;
      if (s.code() == absl::StatusCode::kFailedPrecondition ||
          s.code() == absl::StatusCode::kInvalidArgument) {
        std::cout << task << ": result not taken (" << s.message() << ")" << std::endl;
        return;  // a stale attempt: another one owns the stage
      }
      PutBackLogLines(lines);
      std::cout << task << ": finish not acknowledged (attempt " << attempt << ": " << s.message()
                << "); retrying in " << wait << "s" << std::endl;
      std::this_thread::sleep_for(std::chrono::duration<double>(wait));
      wait = std::min(5.0, wait * 2);
    }
  }

  bool ShouldStop() {
    if (abort_) return true;
    const double lease = lease_s_.load();
    if (lease <= 0) return false;
    const double since =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - last_ack_.load()).count();
    if (since <= lease) return false;
    std::cout << "no word from the coordinator for " << since << "s (lease " << lease
              << "s): stopping the task, which may be running elsewhere by now" << std::endl;
    abort_ = true;
    return true;
  }

  void Acked() { last_ack_ = std::chrono::steady_clock::now(); }

  std::vector<std::string> TakeLogLines() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(log_lines_, {});
  }
  void PutBackLogLines(std::vector<std::string> lines) {
    std::lock_guard<std::mutex> lock(mu_);
    lines.insert(lines.end(), log_lines_.begin(), log_lines_.end());
    log_lines_ = std::move(lines);
  }

  std::unique_ptr<sd::worker::CoordinatorClient> client_;
  sd::metrics::Registry* metrics_;
  std::string id_;
  std::string metrics_address_;
  std::atomic<double> interval_{1};
  std::atomic<double> lease_s_{0};
  std::atomic<std::chrono::steady_clock::time_point> last_ack_{std::chrono::steady_clock::now()};
  std::atomic<bool> abort_{false};
  std::mutex mu_;
  std::string current_task_;
  int64_t current_rank_ = 0;
  std::vector<std::string> log_lines_;
};

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(sd::Args a, sd::Args::Parse(argc, argv,
                                               {"coordinator", "id", "threads", "metrics-port",
                                                "metrics-host", "grpc-port"}));
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  const std::string id = a.Get("id", absl::StrCat(host, "-", ::getpid()));
  ASSIGN_OR_RETURN(int64_t threads, a.Int("threads", 0));
  if (threads > 0) torch::set_num_threads(static_cast<int>(threads));
  sd::metrics::Registry registry;
  ASSIGN_OR_RETURN(int64_t metrics_port, a.Int("metrics-port", 0));
  ASSIGN_OR_RETURN(auto exporter,
                   sd::metrics::HttpExporter::Start(&registry, a.Get("metrics-host", "127.0.0.1"),
                                                    static_cast<int>(metrics_port)));
  registry.GaugeSet("sd_worker_up", "1 while the worker process runs.", {{"worker", id}}, 1);
  sd::worker::InstallCrashHandler(id);
  std::cout << "worker " << id << " metrics on :" << exporter->port() << std::endl;
  const std::string listen_host = a.Get("metrics-host", "127.0.0.1");
  Worker w(sd::worker::CoordinatorClient::Connect(a.Get("coordinator", "127.0.0.1:50051"), id),
           &registry, id, absl::StrCat(listen_host, ":", exporter->port()));
  ASSIGN_OR_RETURN(int64_t grpc_port, a.Int("grpc-port", 0));
  ASSIGN_OR_RETURN(auto agent,
                   sd::worker::AgentServer::Start(listen_host, static_cast<int>(grpc_port),
                                                  [&w] { return w.Describe(); }));
  std::cout << "worker " << id << " gRPC (health, WorkerAgent) on :" << agent->port() << std::endl;
  absl::Status reg;
  for (int i = 0; i < 150; ++i) {  // the coordinator may still be starting
    reg = w.Register();
    if (reg.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  RETURN_IF_ERROR(reg);
  std::cout << "worker " << id << " registered" << std::endl;
  w.Loop();
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::Status s = Run(argc - 1, argv + 1);
  if (!s.ok()) {
    std::cerr << "worker: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
