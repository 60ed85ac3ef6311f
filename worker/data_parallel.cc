#include "worker/data_parallel.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SD_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sd::worker {

absl::StatusOr<std::unique_ptr<DataParallelGroup>> DataParallelGroup::Join(
    const std::string& address, int64_t rank, int64_t world_size, const std::string& backend,
    double timeout_s) {
  if (backend != "gloo" && backend != "nccl")
    return absl::InvalidArgumentError(
        absl::StrCat("c10d backend must be gloo or nccl, got \"", backend, "\""));
  if (backend == "nccl" && !NcclAvailable())
    return absl::FailedPreconditionError(
        "the coordinator chose NCCL but this worker was built without it (LibTorch without "
        "CUDA/NCCL) or sees no GPU");
  const auto colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous address must be host:port, got \"", address, "\""));
  }
  const std::string host = address.substr(0, colon);
  std::unique_ptr<DataParallelGroup> g(new DataParallelGroup());
  g->rank_ = rank;
  g->world_size_ = world_size;
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    g->store_ = c10::make_intrusive<c10d::TCPStore>(host, opts);
    if (backend == "nccl") {
#ifdef SD_WITH_NCCL
      auto pg_opts = c10d::ProcessGroupNCCL::Options::create();
      pg_opts->timeout = opts.timeout;
      g->pg_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store_, static_cast<int>(rank),
                                                           static_cast<int>(world_size), pg_opts);
#endif
    } else {
      auto pg_opts = c10d::ProcessGroupGloo::Options::create(opts.timeout);
      pg_opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      g->pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store_, static_cast<int>(rank),
                                                           static_cast<int>(world_size), pg_opts);
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("rendezvous at ", address, " as rank ", rank, "/",
                                               world_size, " failed: ", e.what()));
  }
  return g;
}

DataParallelGroup::~DataParallelGroup() = default;

bool DataParallelGroup::NcclAvailable() {
#ifdef SD_WITH_NCCL
  return torch::cuda::is_available();
#else
  return false;
#endif
}

void DataParallelGroup::AllReduceMean(std::vector<torch::Tensor>& grads, size_t bucket_bytes) {
  if (world_size_ == 1) return;
  torch::NoGradGuard ng;
  size_t i = 0;
  while (i < grads.size()) {
    std::vector<size_t> members;
    size_t bytes = 0;
    for (; i < grads.size() && (members.empty() || bytes < bucket_bytes); ++i) {
      if (!grads[i].defined()) continue;
      members.push_back(i);
      bytes += grads[i].numel() * grads[i].element_size();
    }
    if (members.empty()) continue;
    std::vector<torch::Tensor> flat_parts;
    flat_parts.reserve(members.size());
    for (size_t m : members) flat_parts.push_back(grads[m].reshape(-1));
    std::vector<torch::Tensor> bucket{torch::cat(flat_parts)};
    pg_->allreduce(bucket)->wait();
    bucket[0].div_(static_cast<double>(world_size_));
    int64_t offset = 0;
    for (size_t m : members) {
      const int64_t n = grads[m].numel();
      grads[m].copy_(bucket[0].slice(0, offset, offset + n).view_as(grads[m]));
      offset += n;
    }
  }
}

void DataParallelGroup::Barrier() {
  if (world_size_ > 1) pg_->barrier()->wait();
}

void DataParallelGroup::Broadcast(std::vector<torch::Tensor>& tensors, int64_t root) {
  if (world_size_ == 1) return;
  torch::NoGradGuard ng;
  for (auto& t : tensors) {
    if (!t.defined()) continue;
    std::vector<torch::Tensor> one{t.is_contiguous() ? t : t.contiguous()};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    pg_->broadcast(one, o)->wait();
    if (!one[0].is_same(t)) t.copy_(one[0]);
  }
}

std::vector<torch::Tensor> DataParallelGroup::AllGather(const torch::Tensor& t) {
  if (world_size_ == 1) return {t};
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> in{t.contiguous()};
  std::vector<std::vector<torch::Tensor>> out(1);
  for (int64_t r = 0; r < world_size_; ++r) out[0].push_back(torch::empty_like(in[0]));
  pg_->allgather(out, in)->wait();
  return out[0];
}

}  // namespace sd::worker
