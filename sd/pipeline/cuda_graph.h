#pragma once
// CUDA graphs for the denoising step: the C++ counterpart of torch.compile's
// "reduce-overhead" mode. The UNet forward is captured once per input shape and
// replayed, so a step costs one graph launch instead of ~2,000 kernel launches
// from the host. CUDA only; on other devices Forward runs the UNet eagerly.
#include <torch/torch.h>

#include <memory>
#include <vector>

#include "sd/models/unet_2d_condition.h"

namespace sd {

class UNetGraph {
 public:
  explicit UNetGraph(UNet2DConditionModel unet);
  ~UNetGraph();
  UNetGraph(const UNetGraph&) = delete;
  UNetGraph& operator=(const UNetGraph&) = delete;

  // Same contract as UNet2DConditionModelImpl::forward. The first call for a set
  // of shapes warms up (three eager passes on a side stream, so cuBLAS/cuDNN
  // choose their algorithms and workspaces outside the capture) and captures;
  // later calls copy the inputs into the captured buffers and replay. The result
  // is a copy: the next replay overwrites the graph's own output.
  torch::Tensor Forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states,
                        const torch::Tensor& timestep_cond = {});
  // Whether the last Forward replayed a graph (false: ran eagerly, not on CUDA).
  bool replayed() const { return replayed_; }
  int64_t captures() const { return captures_; }

 private:
  struct Captured;  // keeps the CUDA headers in the .cc
  UNet2DConditionModel unet_;
  std::unique_ptr<Captured> captured_;
  bool replayed_ = false;
  int64_t captures_ = 0;
};

}  // namespace sd
