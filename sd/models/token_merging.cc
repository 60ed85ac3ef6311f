#include "sd/models/token_merging.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

namespace sd {

TokenMerge::TokenMerge(const torch::Tensor& metric, int64_t w, int64_t h, int64_t sx, int64_t sy,
                       int64_t r, bool no_rand, std::optional<at::Generator> generator)
    : b_(metric.size(0)), n_(metric.size(1)) {
  if (r <= 0) return;
  torch::NoGradGuard no_grad;
  const auto dev = metric.device();
  const auto i64 = torch::TensorOptions().dtype(torch::kLong);
  const int64_t hsy = h / sy, wsx = w / sx;
  // One destination per window: -1 marks it, 0 the sources, so a stable sort of
  // the grid lists destinations then sources, each in raster order.
  torch::Tensor rand_idx = no_rand || !generator
                               ? torch::zeros({hsy, wsx, 1}, i64)
                               : torch::randint(sy * sx, {hsy, wsx, 1}, *generator, i64);
  auto view = torch::zeros({hsy, wsx, sy * sx}, i64);
  view.scatter_(2, rand_idx, -torch::ones_like(rand_idx));
  view = view.view({hsy, wsx, sy, sx}).transpose(1, 2).reshape({hsy * sy, wsx * sx});
  torch::Tensor grid = view;
  if (hsy * sy < h || wsx * sx < w) {  // windows do not tile the grid: the rest are sources
    grid = torch::zeros({h, w}, i64);
    grid.slice(0, 0, hsy * sy).slice(1, 0, wsx * sx).copy_(view);
  }
  // (A bare `true` would bind to sort(dim, descending).)
  const auto order =
      std::get<1>(grid.reshape({1, -1, 1}).sort(std::optional<bool>(true), 1, false)).to(dev);
  num_dst_ = hsy * wsx;
  a_idx_ = order.slice(1, num_dst_);
  b_idx_ = order.slice(1, 0, num_dst_);

  // Cosine similarity of every source to every destination; each source's best
  // match, and the r best-matched sources merge.
  const auto m = metric / metric.norm(2, {-1}, true);
  const int64_t c = m.size(-1), na = n_ - num_dst_;
  const auto a = m.gather(1, a_idx_.expand({b_, na, c}));
  const auto bm = m.gather(1, b_idx_.expand({b_, num_dst_, c}));
  const auto scores = torch::matmul(a, bm.transpose(-1, -2));
  r_ = std::min(na, r);
  auto [node_max, node_idx] = scores.max(-1);
  const auto edge_idx = node_max.argsort(-1, /*descending=*/true).unsqueeze(-1);
  unm_idx_ = edge_idx.slice(1, r_);
  src_idx_ = edge_idx.slice(1, 0, r_);
  dst_idx_ = node_idx.unsqueeze(-1).gather(1, src_idx_);
  const auto a_pos = a_idx_.expand({b_, na, 1});
  unm_pos_ = a_pos.gather(1, unm_idx_);
  src_pos_ = a_pos.gather(1, src_idx_);
}

torch::Tensor TokenMerge::Merge(const torch::Tensor& x) const {
  if (r_ == 0) return x;
  const int64_t c = x.size(-1), na = n_ - num_dst_;
  const auto src = x.gather(1, a_idx_.expand({b_, na, c}));
  auto dst = x.gather(1, b_idx_.expand({b_, num_dst_, c}));
  const auto unm = src.gather(1, unm_idx_.expand({b_, na - r_, c}));
  const auto merged = src.gather(1, src_idx_.expand({b_, r_, c}));
  dst = dst.scatter_reduce(1, dst_idx_.expand({b_, r_, c}), merged, "mean", /*include_self=*/true);
  return torch::cat({unm, dst}, 1);
}

torch::Tensor TokenMerge::Unmerge(const torch::Tensor& x) const {
  if (r_ == 0) return x;
  const int64_t c = x.size(-1), unm_len = n_ - num_dst_ - r_;
  const auto unm = x.slice(1, 0, unm_len);
  const auto dst = x.slice(1, unm_len);
  const auto src = dst.gather(1, dst_idx_.expand({b_, r_, c}));
  auto out = torch::empty({b_, n_, c}, x.options());  // every position is written below
  out.scatter_(1, b_idx_.expand({b_, num_dst_, c}), dst);
  out.scatter_(1, unm_pos_.expand({b_, unm_len, c}), unm);
  out.scatter_(1, src_pos_.expand({b_, r_, c}), src);
  return out;
}

std::optional<TokenMerge> TokenMergingState::ForBlock(const torch::Tensor& x) {
  const int64_t n = x.size(1), tokens = height * width;
  if (n == 0 || tokens == 0) return std::nullopt;
  // tomesd's reading of how far this block is downsampled, its floor division included.
  const int64_t ratio = tokens / n;
  const auto downsample = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(ratio))));
  if (downsample > options.max_downsample) return std::nullopt;
  const int64_t w = (width + downsample - 1) / downsample;
  const int64_t h = (height + downsample - 1) / downsample;
  const auto r = static_cast<int64_t>(static_cast<double>(n) * options.ratio);
  if (r <= 0) return std::nullopt;
  // An odd batch cannot hold a prompt and its unconditional twin together, and
  // tomesd then turns randomness off to avoid artifacts; so do we.
  const bool use_rand = x.size(0) % 2 == 0 && options.use_rand;
  if (use_rand && !generator.defined())
    generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  return TokenMerge(x, w, h, options.sx, options.sy, r, !use_rand,
                    use_rand ? std::optional<at::Generator>(generator) : std::nullopt);
}

}  // namespace sd
