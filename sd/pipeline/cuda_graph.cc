#include "sd/pipeline/cuda_graph.h"

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace sd {
namespace {

std::vector<int64_t> Key(const torch::Tensor& sample, const torch::Tensor& timestep,
                         const torch::Tensor& ctx, const torch::Tensor& cond) {
  std::vector<int64_t> k;
  for (const auto* t : {&sample, &timestep, &ctx, &cond}) {
    k.push_back(t->defined() ? t->dim() : -1);
    if (t->defined()) {
      for (int64_t d : t->sizes()) k.push_back(d);
      k.push_back(static_cast<int64_t>(t->scalar_type()));
    }
  }
  return k;
}

torch::Tensor CloneOrEmpty(const torch::Tensor& t) { return t.defined() ? t.clone() : t; }

}  // namespace

struct UNetGraph::Captured {
  std::vector<int64_t> key;
  torch::Tensor sample, timestep, ctx, cond, out;
  at::cuda::CUDAGraph graph;
};

UNetGraph::UNetGraph(UNet2DConditionModel unet) : unet_(std::move(unet)) {}
UNetGraph::~UNetGraph() = default;

torch::Tensor UNetGraph::Forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                                 const torch::Tensor& ctx, const torch::Tensor& cond) {
  replayed_ = false;
  if (!sample.is_cuda()) return unet_->forward(sample, timestep, ctx, cond);
  TORCH_CHECK(!unet_->token_merging(),
              "CUDA graphs and token merging do not combine: merging draws its destinations "
              "on the CPU each step, which a captured graph would replay frozen");
  const auto t = timestep.to(sample.device());
  auto key = Key(sample, t, ctx, cond);
  if (!captured_ || captured_->key != key) {
    captured_.reset();  // frees the previous graph and its memory pool first
    auto c = std::make_unique<Captured>();
    c->key = std::move(key);
    c->sample = sample.clone();
    c->timestep = t.clone();
    c->ctx = ctx.clone();
    c->cond = CloneOrEmpty(cond);
    auto stream = at::cuda::getStreamFromPool(/*isHighPriority=*/false, sample.device().index());
    torch::cuda::synchronize();  // the clones above ran on the current stream
    {
      const c10::cuda::CUDAStreamGuard guard(stream);
      for (int i = 0; i < 3; ++i) unet_->forward(c->sample, c->timestep, c->ctx, c->cond);
      stream.synchronize();
      c->graph.capture_begin();
      c->out = unet_->forward(c->sample, c->timestep, c->ctx, c->cond);
      c->graph.capture_end();
    }
    stream.synchronize();
    captured_ = std::move(c);
    ++captures_;
  }
  captured_->sample.copy_(sample);
  captured_->timestep.copy_(t);
  captured_->ctx.copy_(ctx);
  if (cond.defined()) captured_->cond.copy_(cond);
  captured_->graph.replay();
  replayed_ = true;
  return captured_->out.clone();
}

}  // namespace sd
