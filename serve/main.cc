// sdserve: serves a model folder the pipeline wrote (fp32/bf16/fp16, INT8 UNet,
// pruned, step- and CFG-distilled) over HTTP (OpenAI's Images API, a web page,
// /metrics) and gRPC (sd.v1.GenerationService), batching requests on one model.
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/flags/inference_flags.h"
#include "common/args.h"
#include "sd/util/status_macros.h"
#include "serve/engine.h"
#include "serve/grpc_front_end.h"
#include "serve/http_api.h"

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

constexpr char kUsage[] =
    "usage: sdserve --model DIR [flags]\n"
    "  --host ADDR                 listen address for HTTP (127.0.0.1)\n"
    "  --http-port N               OpenAI Images API, web page, /metrics (8000; 0: any free)\n"
    "  --grpc-listen HOST:PORT     sd.v1.GenerationService (127.0.0.1:50061; none: off)\n"
    "  --model-name NAME           the model id clients ask for (the folder's name)\n"
    "  --batching none|dynamic|continuous   (continuous)\n"
    "  --max-batch-size N          images per UNet batch (8)\n"
    "  --max-queue-delay-ms MS     dynamic: wait this long for a fuller batch (50)\n"
    "  --preferred-batch-sizes A,B dynamic: start at once at these sizes\n"
    "  --max-queue N               requests waiting; past it HTTP 429 (32)\n"
    "  --request-timeout S         per-request deadline unless the client sets one (600)\n"
    "  --steps N                   default steps (a distilled model's own count, else 50)\n"
    "  --max-steps N               most steps a request may ask for (150)\n"
    "  --seed N                    token merging's destination stream (0)\n"
    "  --threads N                 intra-op CPU threads\n";

absl::Status Run(int argc, char** argv) {
  ASSIGN_OR_RETURN(
      sd::Args a,
      sd::Args::Parse(
          argc, argv,
          sdcli::Concat({"model", "host", "http-port", "grpc-listen", "model-name", "batching",
                         "max-batch-size", "max-queue-delay-ms", "preferred-batch-sizes",
                         "max-queue", "request-timeout", "steps", "max-steps", "seed", "threads",
                         "device", "dtype", "unet"},
                        sdcli::InferenceValueFlags()),
          {"lora"}, sdcli::InferenceSwitches()));
  if (!a.Has("model"))
    return absl::InvalidArgumentError(absl::StrCat("--model DIR is required\n", kUsage,
                                                   sdcli::ModelLoadFlagsUsage(),
                                                   sdcli::InferenceFlagsUsage()));
  const std::string dir = a.Get("model");
  sd::serve::EngineOptions o;
  ASSIGN_OR_RETURN(o.batcher.batching, sd::serve::ParseBatching(a.Get("batching", "continuous")));
  ASSIGN_OR_RETURN(o.batcher.max_batch_size, a.Int("max-batch-size", o.batcher.max_batch_size));
  ASSIGN_OR_RETURN(double delay_ms, a.Double("max-queue-delay-ms", 50));
  o.batcher.max_queue_delay_s = delay_ms / 1000;
  for (absl::string_view p :
       absl::StrSplit(a.Get("preferred-batch-sizes"), ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(p, &v))
      return absl::InvalidArgumentError(
          absl::StrCat("--preferred-batch-sizes must be comma-separated counts, got \"",
                       a.Get("preferred-batch-sizes"), "\""));
    o.batcher.preferred_batch_sizes.push_back(v);
  }
  ASSIGN_OR_RETURN(o.batcher.max_queue, a.Int("max-queue", o.batcher.max_queue));
  RETURN_IF_ERROR(sd::serve::ValidateBatcherOptions(o.batcher));
  ASSIGN_OR_RETURN(o.request_timeout_s, a.Double("request-timeout", o.request_timeout_s));
  const int64_t distilled = sd::DistilledSteps(dir);
  ASSIGN_OR_RETURN(o.default_steps, a.Int("steps", distilled > 0 ? distilled : 50));
  ASSIGN_OR_RETURN(o.max_steps, a.Int("max-steps", std::max<int64_t>(150, o.default_steps)));
  ASSIGN_OR_RETURN(int64_t seed, a.Int("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  o.model_name = a.Get("model-name", std::filesystem::path(dir).lexically_normal().filename());
  if (o.model_name.empty() || o.model_name == ".")
    o.model_name = std::filesystem::absolute(dir).lexically_normal().parent_path().filename();
  ASSIGN_OR_RETURN(o.inference, sdcli::ParseInferenceFlags(a));
  ASSIGN_OR_RETURN(int64_t threads, a.Int("threads", 0));
  if (threads > 0) torch::set_num_threads(static_cast<int>(threads));
  ASSIGN_OR_RETURN(sd::StableDiffusion::LoadOptions load, sdcli::ParseModelLoadFlags(a));
  ASSIGN_OR_RETURN(int64_t http_port, a.Int("http-port", 8000));
  const std::string host = a.Get("host", "127.0.0.1");
  const std::string grpc_listen = a.Get("grpc-listen", "127.0.0.1:50061");

  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(sd::StableDiffusion model, sd::StableDiffusion::Load(dir, load));
  std::cerr << "sdserve: loaded " << dir << " in "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
            << " s\n";
  for (const std::string& n : model.notes) std::cerr << "sdserve: " << n << "\n";
  sd::metrics::Registry registry;
  ASSIGN_OR_RETURN(auto engine, sd::serve::Engine::Start(std::move(model), o, &registry));
  ASSIGN_OR_RETURN(auto http, sd::serve::HttpApi::Start(engine.get(), &registry, host,
                                                        static_cast<int>(http_port)));
  std::unique_ptr<sd::serve::GrpcFrontEnd> grpc;
  if (grpc_listen != "none") {
    ASSIGN_OR_RETURN(grpc, sd::serve::GrpcFrontEnd::Start(engine.get(), grpc_listen));
  }
  // One line a script can wait for and parse (ports chosen with 0 included).
  std::cout << "sdserve ready: model " << o.model_name << " batching "
            << sd::serve::BatchingName(o.batcher.batching) << " http http://" << host << ":"
            << http->port() << " grpc " << (grpc ? grpc->address() : std::string("none"))
            << std::endl;

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::cerr << "sdserve: stopping\n";
  engine->Shutdown();  // everyone waiting gets an answer now
  if (grpc) grpc->Shutdown(5);
  http.reset();
  engine.reset();
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::Status s = Run(argc - 1, argv + 1);
  if (!s.ok()) {
    std::cerr << "sdserve: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
