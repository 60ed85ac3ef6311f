#pragma once
// A c10d process group for one data-parallel stage: TCPStore rendezvous (rank 0
// serves it at the address the coordinator hands out), Gloo on CPU, NCCL when
// the coordinator found a GPU on every rank. Gradients are averaged in flat
// buckets so a many-tensor model needs few collectives.
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "stages/stage.h"

namespace c10d {
class Store;
class Backend;
}  // namespace c10d

namespace sd::worker {

class DataParallelGroup : public sd::stages::Collectives {
 public:
  // address: "host:port"; backend: "gloo" or "nccl" (tensors then live on this
  // rank's current CUDA device). Blocks until all `world_size` ranks have joined.
  static absl::StatusOr<std::unique_ptr<DataParallelGroup>> Join(
      const std::string& address, int64_t rank, int64_t world_size,
      const std::string& backend = "gloo", double timeout_s = 120);
  // Whether this build can form NCCL groups (LibTorch with CUDA and c10d NCCL).
  static bool NcclAvailable();
  ~DataParallelGroup();

  // grads[i] /= world_size after summing across ranks; undefined tensors are skipped.
  void AllReduceMean(std::vector<torch::Tensor>& grads) override {
    AllReduceMean(grads, 25u << 20);
  }
  void AllReduceMean(std::vector<torch::Tensor>& grads, size_t bucket_bytes);
  void Broadcast(std::vector<torch::Tensor>& tensors, int64_t root) override;
  void Barrier() override;
  std::vector<torch::Tensor> AllGather(const torch::Tensor& t) override;
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_size_; }

 private:
  DataParallelGroup() = default;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> pg_;
  int64_t rank_ = 0, world_size_ = 1;
};

}  // namespace sd::worker
