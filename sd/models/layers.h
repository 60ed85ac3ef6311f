#pragma once
// Building blocks shared by the UNet and the VAE. Module and parameter names are
// exactly diffusers' so that loading a state_dict is a name match.
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sd/models/token_merging.h"

namespace sd {

class OnnxEmitter;  // sd/models/onnx_emitter.h

// Each module's ExportOnnx writes its subgraph: `prefix` is its state_dict prefix,
// the string arguments and result are ONNX value names (same layouts as forward).

// Collects attention probabilities when a caller asks for them (attention
// distillation matches these maps between teacher and student).
struct AttentionRecorder {
  bool enabled = false;
  std::vector<std::string> names;
  std::vector<torch::Tensor> maps;  // [batch, heads, query_tokens, key_tokens]
  void Clear() {
    names.clear();
    maps.clear();
  }
};

// Stores every 4-D weight NHWC. oneDNN convolutions then run without per-call
// layout reorders, and the (B, C, H, W) <-> (B, HW, C) permutes around attention
// become free views. Inputs must be channels_last too (the models convert them).
void ToChannelsLast(torch::nn::Module& module);

// Replaces the floating-point forward of one Conv2d or Linear: an INT8 kernel at
// inference, an observer while calibrating. `float_forward` is the layer's own
// forward, for hooks that watch rather than replace.
class LayerHook {
 public:
  virtual ~LayerHook() = default;
  virtual torch::Tensor Forward(
      const torch::Tensor& x,
      const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) = 0;
};

// Conv2d / Linear (same options, parameters and state_dict names)
// with an optional LayerHook. The base forward is not virtual, so the models
// hold these types and a quantizer can swap kernels in without rebuilding them.
struct Conv2dImpl : torch::nn::Conv2dImpl {
  using torch::nn::Conv2dImpl::Conv2dImpl;
  torch::Tensor forward(const torch::Tensor& x);
  std::shared_ptr<LayerHook> hook;
};
TORCH_MODULE(Conv2d);

struct LinearImpl : torch::nn::LinearImpl {
  using torch::nn::LinearImpl::LinearImpl;
  torch::Tensor forward(const torch::Tensor& x);
  std::shared_ptr<LayerHook> hook;
};
TORCH_MODULE(Linear);

torch::Tensor Activation(const std::string& name, const torch::Tensor& x);

// diffusers.models.embeddings.get_timestep_embedding
torch::Tensor TimestepEmbedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                double downscale_freq_shift);
// The same on an ONNX value `timesteps` [B] (float32).
std::string TimestepEmbeddingOnnx(OnnxEmitter& e, const std::string& timesteps, int64_t dim,
                                  bool flip_sin_to_cos, double downscale_freq_shift);

struct ResnetBlock2DImpl : torch::nn::Module {
  // temb_channels <= 0 means no time embedding (VAE).
  ResnetBlock2DImpl(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps,
                    double output_scale_factor = 1.0);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb = {});

  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& temb = "") const;
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  Linear time_emb_proj{nullptr};
  double output_scale_factor;
};
TORCH_MODULE(ResnetBlock2D);

struct Downsample2DImpl : torch::nn::Module {
  Downsample2DImpl(int64_t channels, int64_t out, int64_t padding);
  torch::Tensor forward(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x) const;
  Conv2d conv{nullptr};
  int64_t padding;
};
TORCH_MODULE(Downsample2D);

struct Upsample2DImpl : torch::nn::Module {
  Upsample2DImpl(int64_t channels, int64_t out);
  // `size` is the spatial size to upsample to (the matching skip connection's);
  // empty means twice the input.
  torch::Tensor forward(const torch::Tensor& x, c10::IntArrayRef size = {});
  // `size_like`: a value whose spatial size to upsample to; empty: twice the input.
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& size_like = "") const;
  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// Which of LibTorch's scaled-dot-product-attention kernels attention runs on.
// kAuto is LibTorch's own choice per call; the others call that kernel directly,
// so the choice is per model, not process-wide state (the server runs several
// models). Flash on CPU is LibTorch's CPU flash kernel; on CUDA flash,
// memory-efficient and cuDNN are the kernels xFormers' role is played by.
enum class SdpaBackend { kAuto, kMath, kFlash, kEfficient, kCudnn };
absl::StatusOr<SdpaBackend> ParseSdpaBackend(const std::string& name);
const char* SdpaBackendName(SdpaBackend b);
// Refuses a kernel the device does not have (efficient and cuDNN are CUDA-only).
absl::Status CheckSdpaBackend(SdpaBackend b, const torch::Device& device);
// softmax(q k^T / sqrt(d) + mask) v on `backend`; q, k, v [B, heads, N, d].
torch::Tensor Sdpa(SdpaBackend backend, const torch::Tensor& q, const torch::Tensor& k,
                   const torch::Tensor& v, const torch::Tensor& mask = {});
// Mixed into every attention module, so one walk sets the backend of a UNet, a
// VAE or a text encoder.
struct UsesSdpa {
  virtual ~UsesSdpa() = default;
  SdpaBackend sdpa = SdpaBackend::kAuto;
};
void SetSdpaBackend(torch::nn::Module& module, SdpaBackend backend);

struct AttentionOptions {
  int64_t query_dim = 0;
  int64_t cross_attention_dim = 0;  // 0: self-attention
  int64_t heads = 1;
  int64_t dim_head = 64;
  bool qkv_bias = false;
  bool out_bias = true;
  int64_t norm_groups = 0;  // > 0: a group_norm before attention, residual after (VAE)
  double norm_eps = 1e-6;
  bool upcast = false;
};

// diffusers.models.attention_processor.Attention (to_q/to_k/to_v/to_out.0).
struct AttentionImpl : torch::nn::Module, UsesSdpa {
  AttentionImpl(const AttentionOptions& o, std::shared_ptr<AttentionRecorder> recorder,
                std::string name);
  // x: [B, N, C]; context: [B, M, Cc] or undefined for self-attention.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {});
  // Spatial form used by the VAE mid block: [B, C, H, W] with group_norm and residual.
  torch::Tensor forward_spatial(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& context = "") const;
  std::string ExportOnnxSpatial(OnnxEmitter& e, const std::string& prefix,
                                const std::string& x) const;
  // Inference only: one GEMM for q/k/v (self-attention) or k/v (cross-attention)
  // instead of three. to_q/to_k/to_v then hold views of the fused matrix, so there
  // is one copy of the weights and in-place updates reach both.
  void fuse_projections();
  void unfuse_projections();

  AttentionOptions opt;
  // > 0: attention over at most this many (batch x head) slices at a time, so the
  // score matrix of only those is live (diffusers' attention slicing); < 0: half
  // the heads (diffusers' "auto").
  int64_t slice_size = 0;
  torch::Tensor fused_weight, fused_bias;
  // INT8 self-attention: q, k and v from one kernel (sd/quant installs it).
  std::shared_ptr<LayerHook> fused_hook;
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out;
  torch::nn::GroupNorm group_norm{nullptr};
  std::shared_ptr<AttentionRecorder> recorder;
  std::string name;
};
TORCH_MODULE(Attention);

struct GEGLUImpl : torch::nn::Module {
  GEGLUImpl(int64_t in, int64_t out);
  torch::Tensor forward(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x) const;
  Linear proj{nullptr};
};
TORCH_MODULE(GEGLU);

struct FeedForwardImpl : torch::nn::Module {
  FeedForwardImpl(int64_t dim, int64_t mult = 4);
  torch::Tensor forward(const torch::Tensor& x);
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x) const;
  torch::nn::ModuleList net;  // net.0 = GEGLU, net.1 = dropout, net.2 = Linear
  GEGLU geglu{nullptr};
  Linear out{nullptr};
};
TORCH_MODULE(FeedForward);

struct BasicTransformerBlockImpl : torch::nn::Module {
  BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t cross_dim,
                            bool upcast, const std::shared_ptr<AttentionRecorder>& rec,
                            const std::string& name);
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& context);
  // The plain block: token merging is an inference option, not part of the model.
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& context) const;
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
  // Set by the UNet while token merging is on (shared by all its blocks).
  std::shared_ptr<TokenMergingState> tome;
};
TORCH_MODULE(BasicTransformerBlock);

struct Transformer2DOptions {
  int64_t channels = 0;
  int64_t heads = 1;
  int64_t layers = 1;
  int64_t cross_attention_dim = 768;
  int64_t norm_groups = 32;
  bool use_linear_projection = false;
  bool upcast_attention = false;
};

// diffusers Transformer2DModel for continuous (latent) inputs.
struct Transformer2DModelImpl : torch::nn::Module {
  Transformer2DModelImpl(const Transformer2DOptions& o,
                         const std::shared_ptr<AttentionRecorder>& rec, const std::string& name);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);
  Transformer2DOptions opt;
  std::string ExportOnnx(OnnxEmitter& e, const std::string& prefix, const std::string& x,
                         const std::string& context) const;
  torch::nn::GroupNorm norm{nullptr};
  torch::nn::AnyModule proj_in, proj_out;  // Conv2d 1x1, or Linear with use_linear_projection
  torch::nn::ModuleList transformer_blocks;
};
TORCH_MODULE(Transformer2DModel);

}  // namespace sd
