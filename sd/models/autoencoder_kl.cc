#include "sd/models/autoencoder_kl.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/io/safetensors.h"
#include "sd/models/onnx_emitter.h"
#include "sd/models/state_dict.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {
constexpr double kEps = 1e-6;  // diffusers hard-codes this for every VAE norm

torch::nn::Conv2d Conv3(int64_t in, int64_t out) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1));
}
}  // namespace

absl::StatusOr<VAEConfig> VAEConfig::FromJson(const JsonConfig& c) {
  VAEConfig v;
  ASSIGN_OR_RETURN(v.in_channels, c.Int("in_channels", 3));
  ASSIGN_OR_RETURN(v.out_channels, c.Int("out_channels", 3));
  ASSIGN_OR_RETURN(v.latent_channels, c.Int("latent_channels", 4));
  ASSIGN_OR_RETURN(v.block_out_channels, c.IntList("block_out_channels"));
  ASSIGN_OR_RETURN(v.layers_per_block, c.Int("layers_per_block", 1));
  ASSIGN_OR_RETURN(v.norm_num_groups, c.Int("norm_num_groups", 32));
  ASSIGN_OR_RETURN(v.sample_size, c.Int("sample_size", 32));
  ASSIGN_OR_RETURN(v.scaling_factor, c.Double("scaling_factor", 0.18215));
  RETURN_IF_ERROR(c.Positive("in_channels", v.in_channels));
  RETURN_IF_ERROR(c.Positive("out_channels", v.out_channels));
  RETURN_IF_ERROR(c.Positive("latent_channels", v.latent_channels));
  RETURN_IF_ERROR(c.Positive("block_out_channels", v.block_out_channels));
  RETURN_IF_ERROR(c.Positive("layers_per_block", v.layers_per_block));
  RETURN_IF_ERROR(c.Positive("sample_size", v.sample_size));
  RETURN_IF_ERROR(c.Divides("norm_num_groups", {v.norm_num_groups}, "block_out_channels",
                            v.block_out_channels));
  ASSIGN_OR_RETURN(v.use_quant_conv, c.Bool("use_quant_conv", true));
  ASSIGN_OR_RETURN(v.use_post_quant_conv, c.Bool("use_post_quant_conv", true));
  ASSIGN_OR_RETURN(v.mid_block_add_attention, c.Bool("mid_block_add_attention", true));
  if (c.Has("down_block_types")) {
    ASSIGN_OR_RETURN(auto types, c.StringList("down_block_types"));
    for (const auto& t : types) {
      if (t != "DownEncoderBlock2D")
        return c.Error("down_block_types", absl::StrCat("has unsupported block \"", t, "\""));
    }
    if (types.size() != v.block_out_channels.size())
      return c.Error("down_block_types", "must have one entry per block_out_channels");
  }
  if (c.Has("up_block_types")) {
    ASSIGN_OR_RETURN(auto types, c.StringList("up_block_types"));
    for (const auto& t : types) {
      if (t != "UpDecoderBlock2D")
        return c.Error("up_block_types", absl::StrCat("has unsupported block \"", t, "\""));
    }
  }
  if (c.Has("latents_mean") || c.Has("shift_factor")) {
    if (c.Has("shift_factor") && !c.json()["shift_factor"].is_null())
      return c.Error("shift_factor", "is not supported");
  }
  for (int64_t ch : v.block_out_channels) {
    if (ch % v.norm_num_groups != 0)
      return c.Error(
          "block_out_channels",
          absl::StrCat("entry ", ch, " is not divisible by norm_num_groups ", v.norm_num_groups));
  }
  return v;
}

nlohmann::json VAEConfig::ToJson() const {
  std::vector<std::string> down(block_out_channels.size(), "DownEncoderBlock2D");
  std::vector<std::string> up(block_out_channels.size(), "UpDecoderBlock2D");
  return {{"_class_name", "AutoencoderKL"},
          {"in_channels", in_channels},
          {"out_channels", out_channels},
          {"latent_channels", latent_channels},
          {"block_out_channels", block_out_channels},
          {"layers_per_block", layers_per_block},
          {"norm_num_groups", norm_num_groups},
          {"sample_size", sample_size},
          {"scaling_factor", scaling_factor},
          {"down_block_types", down},
          {"up_block_types", up},
          {"act_fn", "silu"},
          {"use_quant_conv", use_quant_conv},
          {"use_post_quant_conv", use_post_quant_conv},
          {"mid_block_add_attention", mid_block_add_attention}};
}

VAEMidBlockImpl::VAEMidBlockImpl(int64_t c, int64_t groups, bool attention) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnets->push_back(ResnetBlock2D(c, c, 0, groups, kEps));
  resnets->push_back(ResnetBlock2D(c, c, 0, groups, kEps));
  if (attention) {
    attentions = register_module("attentions", torch::nn::ModuleList());
    AttentionOptions a;
    a.query_dim = c;
    a.heads = 1;
    a.dim_head = c;
    a.qkv_bias = true;
    a.norm_groups = groups;
    a.norm_eps = kEps;
    a.upcast = true;
    attentions->push_back(Attention(a, nullptr, "mid_block.attentions.0"));
  }
}

torch::Tensor VAEMidBlockImpl::forward(const torch::Tensor& x) {
  auto h = resnets[0]->as<ResnetBlock2D>()->forward(x);
  if (attentions) h = attentions[0]->as<Attention>()->forward_spatial(h);
  return resnets[1]->as<ResnetBlock2D>()->forward(h);
}

VAEEncoderImpl::VAEEncoderImpl(const VAEConfig& c) {
  const auto& ch = c.block_out_channels;
  conv_in = register_module("conv_in", Conv3(c.in_channels, ch[0]));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out = ch[0];
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t in = out;
    out = ch[i];
    VAEBlock blk;
    blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
    for (int64_t j = 0; j < c.layers_per_block; ++j) {
      blk->resnets->push_back(ResnetBlock2D(j == 0 ? in : out, out, 0, c.norm_num_groups, kEps));
    }
    if (i + 1 < ch.size()) {
      blk->samplers = blk->register_module("downsamplers", torch::nn::ModuleList());
      blk->samplers->push_back(Downsample2D(out, out, 0));
    }
    down_blocks->push_back(blk);
  }
  mid_block = register_module("mid_block",
                              VAEMidBlock(ch.back(), c.norm_num_groups, c.mid_block_add_attention));
  conv_norm_out = register_module(
      "conv_norm_out",
      torch::nn::GroupNorm(torch::nn::GroupNormOptions(c.norm_num_groups, ch.back()).eps(kEps)));
  conv_out = register_module("conv_out", Conv3(ch.back(), 2 * c.latent_channels));
}

torch::Tensor VAEEncoderImpl::forward(const torch::Tensor& x) {
  auto h = conv_in(x);
  for (const auto& m : *down_blocks) {
    auto blk = m->as<VAEBlockImpl>();
    for (const auto& r : *blk->resnets) h = r->as<ResnetBlock2D>()->forward(h);
    if (blk->samplers) h = blk->samplers[0]->as<Downsample2D>()->forward(h);
  }
  h = mid_block(h);
  return conv_out(torch::silu(conv_norm_out(h)));
}

VAEDecoderImpl::VAEDecoderImpl(const VAEConfig& c) {
  std::vector<int64_t> rch(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  conv_in = register_module("conv_in", Conv3(c.latent_channels, rch[0]));
  mid_block = register_module("mid_block",
                              VAEMidBlock(rch[0], c.norm_num_groups, c.mid_block_add_attention));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  int64_t out = rch[0];
  for (size_t i = 0; i < rch.size(); ++i) {
    const int64_t prev = out;
    out = rch[i];
    VAEBlock blk;
    blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
    for (int64_t j = 0; j < c.layers_per_block + 1; ++j) {
      blk->resnets->push_back(ResnetBlock2D(j == 0 ? prev : out, out, 0, c.norm_num_groups, kEps));
    }
    if (i + 1 < rch.size()) {
      blk->samplers = blk->register_module("upsamplers", torch::nn::ModuleList());
      blk->samplers->push_back(Upsample2D(out, out));
    }
    up_blocks->push_back(blk);
  }
  conv_norm_out = register_module(
      "conv_norm_out",
      torch::nn::GroupNorm(torch::nn::GroupNormOptions(c.norm_num_groups, rch.back()).eps(kEps)));
  conv_out = register_module("conv_out", Conv3(rch.back(), c.out_channels));
}

torch::Tensor VAEDecoderImpl::forward(const torch::Tensor& z) {
  auto h = mid_block(conv_in(z));
  for (const auto& m : *up_blocks) {
    auto blk = m->as<VAEBlockImpl>();
    for (const auto& r : *blk->resnets) h = r->as<ResnetBlock2D>()->forward(h);
    if (blk->samplers) h = blk->samplers[0]->as<Upsample2D>()->forward(h);
  }
  return conv_out(torch::silu(conv_norm_out(h)));
}

std::string VAEMidBlockImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                        const std::string& x) const {
  auto h = (*resnets)[0]->as<ResnetBlock2DImpl>()->ExportOnnx(e, prefix + ".resnets.0", x);
  if (attentions) {
    h = (*attentions)[0]->as<AttentionImpl>()->ExportOnnxSpatial(e, prefix + ".attentions.0", h);
  }
  return (*resnets)[1]->as<ResnetBlock2DImpl>()->ExportOnnx(e, prefix + ".resnets.1", h);
}

std::string VAEEncoderImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                       const std::string& x) const {
  auto h = e.Conv2d(prefix + ".conv_in", *conv_in, x);
  for (size_t i = 0; i < down_blocks->size(); ++i) {
    const std::string p = absl::StrCat(prefix, ".down_blocks.", i);
    auto* blk = (*down_blocks)[i]->as<VAEBlockImpl>();
    for (size_t j = 0; j < blk->resnets->size(); ++j) {
      h = (*blk->resnets)[j]->as<ResnetBlock2DImpl>()->ExportOnnx(
          e, absl::StrCat(p, ".resnets.", j), h);
    }
    if (blk->samplers) {
      h = (*blk->samplers)[0]->as<Downsample2DImpl>()->ExportOnnx(
          e, absl::StrCat(p, ".downsamplers.0"), h);
    }
  }
  h = mid_block->ExportOnnx(e, prefix + ".mid_block", h);
  return e.Conv2d(prefix + ".conv_out", *conv_out,
                  e.SiLU(e.GroupNorm(prefix + ".conv_norm_out", *conv_norm_out, h)));
}

std::string VAEDecoderImpl::ExportOnnx(OnnxEmitter& e, const std::string& prefix,
                                       const std::string& z) const {
  auto h =
      mid_block->ExportOnnx(e, prefix + ".mid_block", e.Conv2d(prefix + ".conv_in", *conv_in, z));
  for (size_t i = 0; i < up_blocks->size(); ++i) {
    const std::string p = absl::StrCat(prefix, ".up_blocks.", i);
    auto* blk = (*up_blocks)[i]->as<VAEBlockImpl>();
    for (size_t j = 0; j < blk->resnets->size(); ++j) {
      h = (*blk->resnets)[j]->as<ResnetBlock2DImpl>()->ExportOnnx(
          e, absl::StrCat(p, ".resnets.", j), h);
    }
    if (blk->samplers) {
      h = (*blk->samplers)[0]->as<Upsample2DImpl>()->ExportOnnx(e, absl::StrCat(p, ".upsamplers.0"),
                                                                h);
    }
  }
  return e.Conv2d(prefix + ".conv_out", *conv_out,
                  e.SiLU(e.GroupNorm(prefix + ".conv_norm_out", *conv_norm_out, h)));
}

absl::StatusOr<onnx::Graph> AutoencoderKLImpl::ExportOnnxDecoder() const {
  return BuildOnnxGraph("vae_decoder", [this](onnx::Graph& g) {
    using onnx::Dim;
    OnnxEmitter e(g);
    g.AddInput({"latent_sample",
                onnx::ElemType::kFloat,
                {Dim::Symbolic("batch"), Dim::Fixed(config_.latent_channels),
                 Dim::Symbolic("latent_height"), Dim::Symbolic("latent_width")}});
    std::string z = "latent_sample";
    if (post_quant_conv) z = e.Conv2d("post_quant_conv", *post_quant_conv, z);
    g.Rename(decoder->ExportOnnx(e, "decoder", z), "sample");
    g.AddOutput({"sample",
                 onnx::ElemType::kFloat,
                 {Dim::Symbolic("batch"), Dim::Fixed(config_.out_channels), Dim::Symbolic("height"),
                  Dim::Symbolic("width")}});
  });
}

absl::StatusOr<onnx::Graph> AutoencoderKLImpl::ExportOnnxEncoder() const {
  return BuildOnnxGraph("vae_encoder", [this](onnx::Graph& g) {
    using onnx::Dim;
    OnnxEmitter e(g);
    g.AddInput({"sample",
                onnx::ElemType::kFloat,
                {Dim::Symbolic("batch"), Dim::Fixed(config_.in_channels), Dim::Symbolic("height"),
                 Dim::Symbolic("width")}});
    auto m = encoder->ExportOnnx(e, "encoder", "sample");
    if (quant_conv) m = e.Conv2d("quant_conv", *quant_conv, m);
    g.Rename(m, "latent_parameters");
    g.AddOutput({"latent_parameters",
                 onnx::ElemType::kFloat,
                 {Dim::Symbolic("batch"), Dim::Fixed(2 * config_.latent_channels),
                  Dim::Symbolic("latent_height"), Dim::Symbolic("latent_width")}});
  });
}

torch::Tensor LatentDistribution::sample(const std::optional<at::Generator>& gen) const {
  auto noise = at::randn(mean.sizes(), gen, mean.options());
  return mean + std() * noise;
}

AutoencoderKLImpl::AutoencoderKLImpl(const VAEConfig& c) : config_(c) {
  encoder = register_module("encoder", VAEEncoder(c));
  decoder = register_module("decoder", VAEDecoder(c));
  const int64_t l = c.latent_channels;
  if (c.use_quant_conv)
    quant_conv =
        register_module("quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * l, 2 * l, 1)));
  if (c.use_post_quant_conv)
    post_quant_conv =
        register_module("post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(l, l, 1)));
}

void AutoencoderKLImpl::set_channels_last(bool on) {
  if (on && !channels_last_) ToChannelsLast(*this);
  if (!on && channels_last_) {
    torch::NoGradGuard no_grad;
    for (auto& p : parameters()) p.set_data(p.data().contiguous());
  }
  channels_last_ = on;
}

torch::Tensor AutoencoderKLImpl::encode_moments(const torch::Tensor& images) {
  auto moments =
      encoder(channels_last_ ? images.contiguous(at::MemoryFormat::ChannelsLast) : images);
  if (channels_last_) moments = moments.contiguous();
  if (quant_conv) moments = quant_conv(moments);
  return moments;
}

namespace {

LatentDistribution Posterior(const torch::Tensor& moments) {
  auto parts = moments.chunk(2, 1);
  return {parts[0], torch::clamp(parts[1], -30.0, 20.0)};
}

// diffusers' tiled_encode/tiled_decode: `fn` maps square tiles of side `tile`,
// taken every `stride` input pixels, to output tiles; each output tile is blended
// into the one above and the one to its left over `blend` rows/columns (in place
// and in raster order, as diffusers does, so a blended tile feeds the next blend),
// then cropped to `keep` x `keep` and the crops are concatenated.
torch::Tensor Tiled(const torch::Tensor& x, int64_t tile, int64_t stride, int64_t blend,
                    int64_t keep, const std::function<torch::Tensor(const torch::Tensor&)>& fn) {
  std::vector<std::vector<torch::Tensor>> rows;
  for (int64_t i = 0; i < x.size(2); i += stride) {
    auto& row = rows.emplace_back();
    for (int64_t j = 0; j < x.size(3); j += stride)
      row.push_back(fn(x.slice(2, i, i + tile).slice(3, j, j + tile)));
  }
  // Weights y / extent, computed in double and rounded once as diffusers' Python floats are.
  const auto ramp = [](int64_t extent, const torch::Tensor& like) {
    std::vector<double> w(static_cast<size_t>(extent));
    for (int64_t y = 0; y < extent; ++y)
      w[static_cast<size_t>(y)] = static_cast<double>(y) / static_cast<double>(extent);
    return torch::tensor(w, torch::kFloat64).to(like.device(), like.scalar_type());
  };
  std::vector<torch::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<torch::Tensor> crops;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      auto& t = rows[i][j];
      if (i > 0) {
        const auto& a = rows[i - 1][j];
        const int64_t e = std::min({a.size(2), t.size(2), blend});
        const auto w = ramp(e, t).view({1, 1, e, 1});
        auto head = t.slice(2, 0, e);
        head.copy_(a.slice(2, a.size(2) - e) * (1 - w) + head * w);
      }
      if (j > 0) {
        const auto& a = rows[i][j - 1];
        const int64_t e = std::min({a.size(3), t.size(3), blend});
        const auto w = ramp(e, t).view({1, 1, 1, e});
        auto head = t.slice(3, 0, e);
        head.copy_(a.slice(3, a.size(3) - e) * (1 - w) + head * w);
      }
      crops.push_back(t.slice(2, 0, keep).slice(3, 0, keep));
    }
    out_rows.push_back(torch::cat(crops, 3));
  }
  return torch::cat(out_rows, 2);
}

}  // namespace

LatentDistribution AutoencoderKLImpl::encode(const torch::Tensor& images) {
  return Posterior(encode_moments(images));
}

int64_t AutoencoderKLImpl::latent_tile() const {
  return config_.sample_size >> (config_.block_out_channels.size() - 1);
}

LatentDistribution AutoencoderKLImpl::encode_tiled(const torch::Tensor& images) {
  const int64_t tile = config_.sample_size;
  if (images.size(2) <= tile && images.size(3) <= tile) return encode(images);
  const auto blend = static_cast<int64_t>(static_cast<double>(latent_tile()) * 0.25);
  return Posterior(Tiled(images, tile, static_cast<int64_t>(static_cast<double>(tile) * 0.75),
                         blend, latent_tile() - blend,
                         [this](const torch::Tensor& t) { return encode_moments(t); }));
}

torch::Tensor AutoencoderKLImpl::decode_tiled(const torch::Tensor& latents) {
  const int64_t tile = latent_tile();
  if (latents.size(2) <= tile && latents.size(3) <= tile) return decode(latents);
  const int64_t sample = config_.sample_size;
  const auto blend = static_cast<int64_t>(static_cast<double>(sample) * 0.25);
  return Tiled(latents, tile, static_cast<int64_t>(static_cast<double>(tile) * 0.75), blend,
               sample - blend, [this](const torch::Tensor& t) { return decode(t); });
}

torch::Tensor AutoencoderKLImpl::decode(const torch::Tensor& latents) {
  auto in = channels_last_ ? latents.contiguous(at::MemoryFormat::ChannelsLast) : latents;
  auto z = post_quant_conv ? post_quant_conv(in) : in;
  auto out = decoder(z);
  return channels_last_ ? out.contiguous() : out;
}

absl::StatusOr<AutoencoderKL> LoadVAE(const std::string& dir, bool copy_weights) {
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  ASSIGN_OR_RETURN(JsonConfig json, JsonConfig::Load(config_path));
  ASSIGN_OR_RETURN(VAEConfig cfg, VAEConfig::FromJson(json));
  AutoencoderKL vae(cfg);
  LoadOptions opts;
  opts.copy = copy_weights;
  // Checkpoints written before diffusers 0.14 name the mid-block attention differently.
  opts.renames = {{".attentions.0.query.", ".attentions.0.to_q."},
                  {".attentions.0.key.", ".attentions.0.to_k."},
                  {".attentions.0.value.", ".attentions.0.to_v."},
                  {".attentions.0.proj_attn.", ".attentions.0.to_out.0."}};
  RETURN_IF_ERROR(LoadComponentWeights(*vae, dir, config_path, opts));
  vae->eval();
  return vae;
}

}  // namespace sd
