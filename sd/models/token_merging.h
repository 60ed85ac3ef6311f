#pragma once
// Token merging for Stable Diffusion (Bolya & Hoffman 2023; the tomesd package):
// before a transformer block's self-attention, half of the highest-resolution
// tokens are averaged into their most similar neighbours, attention runs on the
// rest, and the result is copied back to every merged token ("unmerge").
// Names and defaults are tomesd's apply_patch arguments.
#include <torch/torch.h>

#include <cstdint>
#include <optional>

namespace sd {

struct ToMeOptions {
  double ratio = 0.5;          // fraction of a block's tokens merged away (<= 1 - 1/(sx*sy))
  int64_t max_downsample = 1;  // merge in blocks at most this far downsampled (1, 2, 4, 8)
  int64_t sx = 2, sy = 2;      // one destination token per sy x sx window
  bool use_rand = true;        // random destination per window (else its top-left token)
  bool merge_attn = true;      // around self-attention
  bool merge_crossattn = false;
  bool merge_mlp = false;
  uint64_t seed = 0;  // the destination generator's seed (the pipeline passes its own)
};

// One bipartite soft matching: which source token merges into which destination.
// Built from the block's input (the similarity metric) and applied to the
// normalised activations, as tomesd does.
class TokenMerge {
 public:
  // metric [B, N, C] on a w x h token grid. r tokens are merged; r == 0 makes an
  // identity. `generator` draws the destinations unless `no_rand`.
  TokenMerge(const torch::Tensor& metric, int64_t w, int64_t h, int64_t sx, int64_t sy, int64_t r,
             bool no_rand, std::optional<at::Generator> generator);
  // [B, N, C] -> [B, N - r, C]: unmerged sources, then destinations (means of
  // themselves and the sources merged into them).
  torch::Tensor Merge(const torch::Tensor& x) const;
  // [B, N - r, C] -> [B, N, C]: each merged source takes its destination's value.
  torch::Tensor Unmerge(const torch::Tensor& x) const;
  int64_t merged() const { return r_; }

 private:
  int64_t b_ = 0, n_ = 0, r_ = 0, num_dst_ = 0;
  torch::Tensor a_idx_, b_idx_;                // [1, N - num_dst, 1], [1, num_dst, 1]
  torch::Tensor unm_idx_, src_idx_, dst_idx_;  // [B, Na - r, 1], [B, r, 1], [B, r, 1]
  torch::Tensor unm_pos_, src_pos_;            // token positions of unm_idx_ / src_idx_
};

// What the transformer blocks of one UNet share: the options, the latent size of
// the current forward and the destination generator.
struct TokenMergingState {
  ToMeOptions options;
  int64_t height = 0, width = 0;  // the UNet input's spatial size
  at::Generator generator;
  // The merge for a block input x [B, N, C], or nullopt where tomesd would not
  // merge (downsampled past max_downsample, or nothing to merge).
  std::optional<TokenMerge> ForBlock(const torch::Tensor& x);
};

}  // namespace sd
