// worker: registers with the coordinator, heartbeats, runs the stage tasks it is
// given (joining the stage's c10d group), reports progress, finishes or fails.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/sdctl/args.h"
#include "common/http_exporter.h"
#include "common/job_spec.h"
#include "common/metrics.h"
#include "sd/util/status_macros.h"
#include "stages/stage.h"
#include "worker/coordinator_client.h"
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

  absl::Status Register() {
    const bool cuda = torch::cuda::is_available();
    auto interval =
        client_->Register(cuda ? "cuda" : "cpu", cuda ? torch::cuda::device_count() : 1,
                          std::thread::hardware_concurrency(), MemoryBytes(), metrics_address_);
    if (!interval.ok()) return interval.status();
    interval_ = *interval;
    return absl::OkStatus();
  }

  void HeartbeatLoop() {
    while (true) {
      auto abort = client_->Heartbeat();
      if (abort.ok() && !abort->empty()) {
        std::lock_guard<std::mutex> lock(mu_);
        if (*abort == current_task_) abort_ = true;
      } else if (!abort.ok() && abort.status().code() == absl::StatusCode::kNotFound) {
        Register().IgnoreError();  // the coordinator restarted or expired us
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(interval_));
    }
  }

  absl::Status RunTask(const sd::worker::TaskSpec& task) {
    ASSIGN_OR_RETURN(sd::JobSpec job, sd::ParseJobSpec(task.job_yaml, task.job_id));
    ASSIGN_OR_RETURN(auto stage, sd::stages::MakeStage(task.stage));
    sd::stages::StageContext ctx;
    ctx.job = job;
    ctx.rank = task.rank;
    ctx.world_size = task.world_size;
    ctx.checkpoint_dir = task.checkpoint_dir;
    ctx.output_dir = task.output_dir;
    ctx.input_model = task.input_model.empty() ? job.model : task.input_model;
    if (torch::cuda::is_available()) {
      // One GPU per rank on multi-GPU hosts (NCCL wants its rank's device current).
      ctx.device =
          torch::Device(torch::kCUDA, static_cast<int>(task.rank % torch::cuda::device_count()));
    }
    std::unique_ptr<sd::worker::DataParallelGroup> group;
    if (ctx.world_size > 1) {
      ASSIGN_OR_RETURN(
          group, sd::worker::DataParallelGroup::Join(task.rendezvous, ctx.rank, ctx.world_size,
                                                     task.backend.empty() ? "gloo" : task.backend));
      ctx.all_reduce_mean = [&group](std::vector<torch::Tensor>& g) { group->AllReduceMean(g); };
    }
    ctx.should_stop = [this](int64_t) { return abort_.load(); };
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
      auto abort = client_->Progress(task.task_id, p.step, p.total_steps, p.loss, p.step_time_s,
                                     p.samples_per_s);
      if (abort.ok() && *abort) abort_ = true;
    };
    return stage->Run(ctx);
  }

  void Loop() {
    std::thread(&Worker::HeartbeatLoop, this).detach();
    while (true) {
      auto task = client_->Poll();
      if (!task.ok() || !task->has_value()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        continue;
      }
      const sd::worker::TaskSpec& t = **task;
      {
        std::lock_guard<std::mutex> lock(mu_);
        current_task_ = t.task_id;
        abort_ = false;
      }
      std::cout << "running " << t.task_id << " as rank " << t.rank << "/" << t.world_size
                << std::endl;
      absl::Status result;
      try {
        result = RunTask(t);
      } catch (const std::exception& e) {
        result = absl::InternalError(e.what());
      }
      std::cout << t.task_id << ": " << (result.ok() ? "done" : result.ToString()) << std::endl;
      client_->Finish(t.task_id, result).IgnoreError();
      std::lock_guard<std::mutex> lock(mu_);
      current_task_.clear();
    }
  }

 private:
  std::unique_ptr<sd::worker::CoordinatorClient> client_;
  sd::metrics::Registry* metrics_;
  std::string id_;
  std::string metrics_address_;
  double interval_ = 1;
  std::atomic<bool> abort_{false};
  std::mutex mu_;
  std::string current_task_;
};

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(sdctl::Args a,
                   sdctl::Args::Parse(argc, argv,
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
