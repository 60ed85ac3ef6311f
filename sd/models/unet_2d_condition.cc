#include "sd/models/unet_2d_condition.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sd/io/safetensors.h"
#include "sd/models/onnx_emitter.h"
#include "sd/models/state_dict.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {

bool IsCrossAttn(const std::string& type) { return type.rfind("CrossAttn", 0) == 0; }

// Settings the C++ UNet does not implement are refused rather than ignored,
// so an unusual checkpoint fails loudly instead of producing wrong images.
absl::Status RequireDefault(const JsonConfig& c, const std::string& key,
                            const nlohmann::json& expected) {
  if (!c.Has(key)) return absl::OkStatus();
  if (c.json()[key] == expected) return absl::OkStatus();
  return c.Error(key, absl::StrCat("is not supported (only ", expected.dump(), ")"));
}

}  // namespace

absl::StatusOr<UNetConfig> UNetConfig::FromJson(const JsonConfig& c) {
  UNetConfig u;
  ASSIGN_OR_RETURN(u.in_channels, c.Int("in_channels", 4));
  ASSIGN_OR_RETURN(u.out_channels, c.Int("out_channels", 4));
  ASSIGN_OR_RETURN(u.sample_size, c.Int("sample_size", 64));
  ASSIGN_OR_RETURN(u.down_block_types, c.StringList("down_block_types"));
  ASSIGN_OR_RETURN(u.up_block_types, c.StringList("up_block_types"));
  ASSIGN_OR_RETURN(u.block_out_channels, c.IntList("block_out_channels"));
  const size_t n = u.block_out_channels.size();
  if (u.down_block_types.size() != n)
    return c.Error("down_block_types",
                   absl::StrCat("must have ", n, " entries like block_out_channels"));
  if (u.up_block_types.size() != n)
    return c.Error("up_block_types",
                   absl::StrCat("must have ", n, " entries like block_out_channels"));
  for (const auto& t : u.down_block_types) {
    if (t != "CrossAttnDownBlock2D" && t != "DownBlock2D")
      return c.Error("down_block_types", absl::StrCat("has unsupported block \"", t, "\""));
  }
  for (const auto& t : u.up_block_types) {
    if (t != "CrossAttnUpBlock2D" && t != "UpBlock2D")
      return c.Error("up_block_types", absl::StrCat("has unsupported block \"", t, "\""));
  }
  ASSIGN_OR_RETURN(std::string mid, c.String("mid_block_type", "UNetMidBlock2DCrossAttn"));
  if (c.Has("mid_block_type") && c.json()["mid_block_type"].is_null()) mid = "";
  if (!mid.empty() && mid != "UNetMidBlock2DCrossAttn")
    return c.Error("mid_block_type", "is not supported");
  u.mid_block = !mid.empty();
  ASSIGN_OR_RETURN(u.layers_per_block, c.Int("layers_per_block", 2));
  // diffusers names the head count "attention_head_dim" in SD1.x configs and uses
  // num_attention_heads only when set; mirror that resolution exactly.
  const std::string heads_key =
      c.Has("num_attention_heads") ? "num_attention_heads" : "attention_head_dim";
  ASSIGN_OR_RETURN(u.num_attention_heads, c.IntOrList(heads_key, n, 8));
  ASSIGN_OR_RETURN(u.transformer_layers_per_block,
                   c.IntOrList("transformer_layers_per_block", n, 1));
  if (c.Has("cross_attention_dim") && !c.json()["cross_attention_dim"].is_number_integer()) {
    return c.Error("cross_attention_dim", "must be a single integer");
  }
  ASSIGN_OR_RETURN(u.cross_attention_dim, c.Int("cross_attention_dim", 1280));
  ASSIGN_OR_RETURN(u.norm_num_groups, c.Int("norm_num_groups", 32));
  RETURN_IF_ERROR(c.Positive("in_channels", u.in_channels));
  RETURN_IF_ERROR(c.Positive("out_channels", u.out_channels));
  RETURN_IF_ERROR(c.Positive("sample_size", u.sample_size));
  RETURN_IF_ERROR(c.Positive("block_out_channels", u.block_out_channels));
  RETURN_IF_ERROR(c.Positive("layers_per_block", u.layers_per_block));
  RETURN_IF_ERROR(c.Positive("cross_attention_dim", u.cross_attention_dim));
  RETURN_IF_ERROR(c.Positive("transformer_layers_per_block", u.transformer_layers_per_block));
  RETURN_IF_ERROR(
      c.Divides(heads_key, u.num_attention_heads, "block_out_channels", u.block_out_channels));
  RETURN_IF_ERROR(c.Divides("norm_num_groups", {u.norm_num_groups}, "block_out_channels",
                            u.block_out_channels));
  ASSIGN_OR_RETURN(u.norm_eps, c.Double("norm_eps", 1e-5));
  ASSIGN_OR_RETURN(u.downsample_padding, c.Int("downsample_padding", 1));
  ASSIGN_OR_RETURN(u.mid_block_scale_factor, c.Double("mid_block_scale_factor", 1.0));
  ASSIGN_OR_RETURN(u.flip_sin_to_cos, c.Bool("flip_sin_to_cos", true));
  ASSIGN_OR_RETURN(u.freq_shift, c.Double("freq_shift", 0));
  ASSIGN_OR_RETURN(u.use_linear_projection, c.Bool("use_linear_projection", false));
  ASSIGN_OR_RETURN(u.upcast_attention, c.Bool("upcast_attention", false));
  ASSIGN_OR_RETURN(u.center_input_sample, c.Bool("center_input_sample", false));
  ASSIGN_OR_RETURN(std::string act, c.String("act_fn", "silu"));
  if (act != "silu" && act != "swish") return c.Error("act_fn", "is not supported (only silu)");
  for (const char* key :
       {"class_embed_type", "addition_embed_type", "encoder_hid_dim", "num_class_embeds",
        "projection_class_embeddings_input_dim", "time_embedding_act_fn", "timestep_post_act"}) {
    RETURN_IF_ERROR(RequireDefault(c, key, nullptr));
  }
  if (c.Has("time_cond_proj_dim") && !c.json()["time_cond_proj_dim"].is_null()) {
    ASSIGN_OR_RETURN(u.time_cond_proj_dim, c.Int("time_cond_proj_dim", 0));
    if (u.time_cond_proj_dim <= 0) return c.Error("time_cond_proj_dim", "must be positive or null");
  }
  if (c.Has("time_embedding_dim") && !c.json()["time_embedding_dim"].is_null()) {
    ASSIGN_OR_RETURN(u.time_embedding_dim, c.Int("time_embedding_dim", 0));
    if (u.time_embedding_dim <= 0) return c.Error("time_embedding_dim", "must be positive or null");
  }
  RETURN_IF_ERROR(RequireDefault(c, "only_cross_attention", false));
  RETURN_IF_ERROR(RequireDefault(c, "dual_cross_attention", false));
  RETURN_IF_ERROR(RequireDefault(c, "resnet_time_scale_shift", "default"));
  RETURN_IF_ERROR(RequireDefault(c, "conv_in_kernel", 3));
  RETURN_IF_ERROR(RequireDefault(c, "conv_out_kernel", 3));
  RETURN_IF_ERROR(RequireDefault(c, "attention_type", "default"));
  RETURN_IF_ERROR(RequireDefault(c, "time_embedding_type", "positional"));
  for (size_t i = 0; i < n; ++i) {
    const int64_t ch = u.block_out_channels[i];
    if (ch % u.norm_num_groups != 0)
      return c.Error(
          "block_out_channels",
          absl::StrCat("entry ", ch, " is not divisible by norm_num_groups ", u.norm_num_groups));
    if (ch % u.num_attention_heads[i] != 0)
      return c.Error(heads_key, absl::StrCat("entry ", u.num_attention_heads[i],
                                             " does not divide block_out_channels ", ch));
  }
  return u;
}

nlohmann::json UNetConfig::ToJson() const {
  return {{"_class_name", "UNet2DConditionModel"},
          {"in_channels", in_channels},
          {"out_channels", out_channels},
          {"sample_size", sample_size},
          {"down_block_types", down_block_types},
          {"up_block_types", up_block_types},
          {"mid_block_type",
           mid_block ? nlohmann::json("UNetMidBlock2DCrossAttn") : nlohmann::json(nullptr)},
          {"block_out_channels", block_out_channels},
          {"layers_per_block", layers_per_block},
          {"attention_head_dim", num_attention_heads},
          {"transformer_layers_per_block", transformer_layers_per_block},
          {"cross_attention_dim", cross_attention_dim},
          {"norm_num_groups", norm_num_groups},
          {"norm_eps", norm_eps},
          {"downsample_padding", downsample_padding},
          {"mid_block_scale_factor", mid_block_scale_factor},
          {"flip_sin_to_cos", flip_sin_to_cos},
          {"freq_shift", freq_shift},
          {"use_linear_projection", use_linear_projection},
          {"upcast_attention", upcast_attention},
          {"center_input_sample", center_input_sample},
          {"act_fn", "silu"},
          {"time_cond_proj_dim",
           time_cond_proj_dim > 0 ? nlohmann::json(time_cond_proj_dim) : nlohmann::json(nullptr)},
          {"time_embedding_dim",
           time_embedding_dim > 0 ? nlohmann::json(time_embedding_dim) : nlohmann::json(nullptr)}};
}

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNetConfig& cfg)
    : config_(cfg), recorder_(std::make_shared<AttentionRecorder>()) {
  const auto& ch = cfg.block_out_channels;
  const size_t n = ch.size();
  const int64_t temb_dim = cfg.temb_dim();
  conv_in = register_module("conv_in",
                            Conv2d(torch::nn::Conv2dOptions(cfg.in_channels, ch[0], 3).padding(1)));
  auto time_embedding = std::make_shared<torch::nn::Module>();
  time_linear_1 = time_embedding->register_module("linear_1", Linear(ch[0], temb_dim));
  time_linear_2 = time_embedding->register_module("linear_2", Linear(temb_dim, temb_dim));
  if (cfg.time_cond_proj_dim > 0) {
    time_cond_proj = time_embedding->register_module(
        "cond_proj", Linear(torch::nn::LinearOptions(cfg.time_cond_proj_dim, ch[0]).bias(false)));
  }
  register_module("time_embedding", time_embedding);

  auto transformer = [&](int64_t channels, int64_t heads, int64_t layers, const std::string& name) {
    Transformer2DOptions o;
    o.channels = channels;
    o.heads = heads;
    o.layers = layers;
    o.cross_attention_dim = cfg.cross_attention_dim;
    o.norm_groups = cfg.norm_num_groups;
    o.use_linear_projection = cfg.use_linear_projection;
    o.upcast_attention = cfg.upcast_attention;
    return Transformer2DModel(o, recorder_, name);
  };

  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out_ch = ch[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t in_ch = out_ch;
    out_ch = ch[i];
    const bool final_block = i == n - 1;
    const std::string prefix = absl::StrCat("down_blocks.", i);
    UNetBlock blk;
    blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
    const bool cross = IsCrossAttn(cfg.down_block_types[i]);
    if (cross) blk->attentions = blk->register_module("attentions", torch::nn::ModuleList());
    for (int64_t j = 0; j < cfg.layers_per_block; ++j) {
      blk->resnets->push_back(ResnetBlock2D(j == 0 ? in_ch : out_ch, out_ch, temb_dim,
                                            cfg.norm_num_groups, cfg.norm_eps));
      if (cross) {
        blk->attentions->push_back(transformer(out_ch, cfg.num_attention_heads[i],
                                               cfg.transformer_layers_per_block[i],
                                               absl::StrCat(prefix, ".attentions.", j)));
      }
    }
    if (!final_block) {
      blk->downsamplers = blk->register_module("downsamplers", torch::nn::ModuleList());
      blk->downsamplers->push_back(Downsample2D(out_ch, out_ch, cfg.downsample_padding));
    }
    down_blocks->push_back(blk);
  }

  if (cfg.mid_block) {
    const int64_t c = ch.back();
    mid = UNetBlock();
    mid->resnets = mid->register_module("resnets", torch::nn::ModuleList());
    mid->attentions = mid->register_module("attentions", torch::nn::ModuleList());
    mid->resnets->push_back(ResnetBlock2D(c, c, temb_dim, cfg.norm_num_groups, cfg.norm_eps,
                                          cfg.mid_block_scale_factor));
    mid->attentions->push_back(transformer(c, cfg.num_attention_heads.back(),
                                           cfg.transformer_layers_per_block.back(),
                                           "mid_block.attentions.0"));
    mid->resnets->push_back(ResnetBlock2D(c, c, temb_dim, cfg.norm_num_groups, cfg.norm_eps,
                                          cfg.mid_block_scale_factor));
    register_module("mid_block", mid);
  }

  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  std::vector<int64_t> rch(ch.rbegin(), ch.rend());
  std::vector<int64_t> rheads(cfg.num_attention_heads.rbegin(), cfg.num_attention_heads.rend());
  std::vector<int64_t> rlayers(cfg.transformer_layers_per_block.rbegin(),
                               cfg.transformer_layers_per_block.rend());
  out_ch = rch[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t prev_out = out_ch;
    out_ch = rch[i];
    const int64_t in_ch = rch[std::min(i + 1, n - 1)];
    const bool final_block = i == n - 1;
    const int64_t layers = cfg.layers_per_block + 1;
    const std::string prefix = absl::StrCat("up_blocks.", i);
    UNetBlock blk;
    blk->resnets = blk->register_module("resnets", torch::nn::ModuleList());
    const bool cross = IsCrossAttn(cfg.up_block_types[i]);
    if (cross) blk->attentions = blk->register_module("attentions", torch::nn::ModuleList());
    for (int64_t j = 0; j < layers; ++j) {
      const int64_t skip = j == layers - 1 ? in_ch : out_ch;
      const int64_t res_in = j == 0 ? prev_out : out_ch;
      blk->resnets->push_back(
          ResnetBlock2D(res_in + skip, out_ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps));
      if (cross) {
        blk->attentions->push_back(
            transformer(out_ch, rheads[i], rlayers[i], absl::StrCat(prefix, ".attentions.", j)));
      }
    }
    if (!final_block) {
      blk->upsamplers = blk->register_module("upsamplers", torch::nn::ModuleList());
      blk->upsamplers->push_back(Upsample2D(out_ch, out_ch));
    }
    up_blocks->push_back(blk);
  }

  conv_norm_out = register_module(
      "conv_norm_out",
      torch::nn::GroupNorm(
          torch::nn::GroupNormOptions(cfg.norm_num_groups, ch[0]).eps(cfg.norm_eps)));
  conv_out = register_module(
      "conv_out", Conv2d(torch::nn::Conv2dOptions(ch[0], cfg.out_channels, 3).padding(1)));
}

torch::Tensor UNet2DConditionModelImpl::forward(const torch::Tensor& sample_in,
                                                const torch::Tensor& timestep,
                                                const torch::Tensor& context,
                                                const torch::Tensor& timestep_cond) {
  if (recorder_->enabled) recorder_->Clear();
  if (tome_) {
    tome_->height = sample_in.size(2);
    tome_->width = sample_in.size(3);
  }
  auto sample = config_.center_input_sample ? 2 * sample_in - 1.0 : sample_in;
  const int64_t b = sample.size(0);
  auto t = timestep.to(sample.device());
  if (t.dim() == 0) t = t.unsqueeze(0);
  t = t.expand({b});
  auto temb = TimestepEmbedding(t, config_.block_out_channels[0], config_.flip_sin_to_cos,
                                config_.freq_shift)
                  .to(sample.scalar_type());
  if (timestep_cond.defined()) {
    TORCH_CHECK(time_cond_proj, "timestep_cond given to a UNet without time_cond_proj_dim");
    temb = temb + time_cond_proj(timestep_cond.to(sample.device(), sample.scalar_type()));
  }
  temb = time_linear_2(torch::silu(time_linear_1(temb)));

  if (channels_last_) sample = sample.contiguous(at::MemoryFormat::ChannelsLast);
  auto h = conv_in(sample);
  std::vector<torch::Tensor> skips{h};
  for (const auto& m : *down_blocks) {
    auto blk = m->as<UNetBlockImpl>();
    for (size_t j = 0; j < blk->resnets->size(); ++j) {
      h = blk->resnets[j]->as<ResnetBlock2D>()->forward(h, temb);
      if (blk->attentions) h = blk->attentions[j]->as<Transformer2DModel>()->forward(h, context);
      skips.push_back(h);
    }
    if (blk->downsamplers) {
      h = blk->downsamplers[0]->as<Downsample2D>()->forward(h);
      skips.push_back(h);
    }
    if (block_outputs_) block_outputs_->push_back(h);
  }
  if (mid) {
    h = mid->resnets[0]->as<ResnetBlock2D>()->forward(h, temb);
    h = mid->attentions[0]->as<Transformer2DModel>()->forward(h, context);
    h = mid->resnets[1]->as<ResnetBlock2D>()->forward(h, temb);
    if (block_outputs_) block_outputs_->push_back(h);
  }
  for (const auto& m : *up_blocks) {
    auto blk = m->as<UNetBlockImpl>();
    for (size_t j = 0; j < blk->resnets->size(); ++j) {
      auto skip = skips.back();
      skips.pop_back();
      h = blk->resnets[j]->as<ResnetBlock2D>()->forward(torch::cat({h, skip}, 1), temb);
      if (blk->attentions) h = blk->attentions[j]->as<Transformer2DModel>()->forward(h, context);
    }
    if (blk->upsamplers) {
      // Upsample to the next skip's size, which also handles latents not divisible by 2^n.
      h = blk->upsamplers[0]->as<Upsample2D>()->forward(h, skips.back().sizes().slice(2));
    }
    if (block_outputs_) block_outputs_->push_back(h);
  }
  h = conv_out(torch::silu(conv_norm_out(h)));
  return channels_last_ ? h.contiguous() : h;
}

absl::StatusOr<onnx::Graph> UNet2DConditionModelImpl::ExportOnnx() const {
  return BuildOnnxGraph("unet", [this](onnx::Graph& g) {
    using onnx::Dim;
    const auto& c = config_;
    OnnxEmitter e(g);
    g.AddInput({"sample",
                onnx::ElemType::kFloat,
                {Dim::Symbolic("batch"), Dim::Fixed(c.in_channels), Dim::Symbolic("height"),
                 Dim::Symbolic("width")}});
    g.AddInput({"timestep", onnx::ElemType::kFloat, {Dim::Symbolic("timestep_batch")}});
    g.AddInput(
        {"encoder_hidden_states",
         onnx::ElemType::kFloat,
         {Dim::Symbolic("batch"), Dim::Symbolic("sequence"), Dim::Fixed(c.cross_attention_dim)}});
    if (c.time_cond_proj_dim > 0) {
      g.AddInput({"timestep_cond",
                  onnx::ElemType::kFloat,
                  {Dim::Symbolic("batch"), Dim::Fixed(c.time_cond_proj_dim)}});
    }
    const std::string context = "encoder_hidden_states";
    auto sample = std::string("sample");
    if (c.center_input_sample) sample = g.Op("Sub", {e.Scale(sample, 2.0f), g.Float(1.0f)});
    // One timestep for the whole batch, or one per sample, as forward's expand.
    const auto t = g.Op("Expand", {"timestep", e.Shape(sample, 0, 1)});
    auto temb = [&] {
      onnx::Scope scope(g, "time_embedding");
      auto emb =
          TimestepEmbeddingOnnx(e, t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
      if (time_cond_proj) {
        emb = e.Add(emb, e.Linear("time_embedding.cond_proj", *time_cond_proj, "timestep_cond"));
      }
      return e.Linear("time_embedding.linear_2", *time_linear_2,
                      e.SiLU(e.Linear("time_embedding.linear_1", *time_linear_1, emb)));
    }();

    auto h = e.Conv2d("conv_in", *conv_in, sample);
    std::vector<std::string> skips{h};
    for (size_t i = 0; i < down_blocks->size(); ++i) {
      const std::string p = absl::StrCat("down_blocks.", i);
      auto* blk = (*down_blocks)[i]->as<UNetBlockImpl>();
      for (size_t j = 0; j < blk->resnets->size(); ++j) {
        h = (*blk->resnets)[j]->as<ResnetBlock2DImpl>()->ExportOnnx(
            e, absl::StrCat(p, ".resnets.", j), h, temb);
        if (blk->attentions) {
          h = (*blk->attentions)[j]->as<Transformer2DModelImpl>()->ExportOnnx(
              e, absl::StrCat(p, ".attentions.", j), h, context);
        }
        skips.push_back(h);
      }
      if (blk->downsamplers) {
        h = (*blk->downsamplers)[0]->as<Downsample2DImpl>()->ExportOnnx(
            e, absl::StrCat(p, ".downsamplers.0"), h);
        skips.push_back(h);
      }
    }
    if (mid) {
      h = (*mid->resnets)[0]->as<ResnetBlock2DImpl>()->ExportOnnx(e, "mid_block.resnets.0", h,
                                                                  temb);
      h = (*mid->attentions)[0]->as<Transformer2DModelImpl>()->ExportOnnx(
          e, "mid_block.attentions.0", h, context);
      h = (*mid->resnets)[1]->as<ResnetBlock2DImpl>()->ExportOnnx(e, "mid_block.resnets.1", h,
                                                                  temb);
    }
    for (size_t i = 0; i < up_blocks->size(); ++i) {
      const std::string p = absl::StrCat("up_blocks.", i);
      auto* blk = (*up_blocks)[i]->as<UNetBlockImpl>();
      for (size_t j = 0; j < blk->resnets->size(); ++j) {
        const auto skip = skips.back();
        skips.pop_back();
        h = (*blk->resnets)[j]->as<ResnetBlock2DImpl>()->ExportOnnx(
            e, absl::StrCat(p, ".resnets.", j), g.Op("Concat", {h, skip}, {{"axis", int64_t{1}}}),
            temb);
        if (blk->attentions) {
          h = (*blk->attentions)[j]->as<Transformer2DModelImpl>()->ExportOnnx(
              e, absl::StrCat(p, ".attentions.", j), h, context);
        }
      }
      if (blk->upsamplers) {
        h = (*blk->upsamplers)[0]->as<Upsample2DImpl>()->ExportOnnx(
            e, absl::StrCat(p, ".upsamplers.0"), h, skips.back());
      }
    }
    h = e.Conv2d("conv_out", *conv_out, e.SiLU(e.GroupNorm("conv_norm_out", *conv_norm_out, h)));
    g.Rename(h, "out_sample");
    g.AddOutput({"out_sample",
                 onnx::ElemType::kFloat,
                 {Dim::Symbolic("batch"), Dim::Fixed(c.out_channels), Dim::Symbolic("height"),
                  Dim::Symbolic("width")}});
  });
}

void UNet2DConditionModelImpl::fuse_qkv_projections(bool on) {
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* attn = m->as<AttentionImpl>()) {
      if (on) {
        attn->fuse_projections();
      } else {
        attn->unfuse_projections();
      }
    }
  }
}

void UNet2DConditionModelImpl::set_token_merging(const std::optional<ToMeOptions>& options) {
  tome_.reset();
  if (options) {
    tome_ = std::make_shared<TokenMergingState>();
    tome_->options = *options;
  }
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* blk = m->as<BasicTransformerBlockImpl>()) blk->tome = tome_;
  }
}

void UNet2DConditionModelImpl::set_attention_slice(int64_t slice_size) {
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* attn = m->as<AttentionImpl>()) attn->slice_size = slice_size;
  }
}

void UNet2DConditionModelImpl::set_channels_last(bool on) {
  if (on && !channels_last_) ToChannelsLast(*this);
  if (!on && channels_last_) {
    torch::NoGradGuard no_grad;
    for (auto& p : parameters()) p.set_data(p.data().contiguous());
  }
  channels_last_ = on;
}

torch::Tensor GuidanceScaleEmbedding(const torch::Tensor& w, int64_t dim) {
  const auto w1000 = w.to(torch::kFloat32).flatten() * 1000.0;
  const int64_t half = dim / 2;
  // In float32 step for step as diffusers (sin of w * 1000 * freq amplifies any
  // difference in the last bit of freq).
  const auto scale = torch::log(torch::tensor(10000.0f)) / (half - 1);
  const auto freqs = torch::exp(torch::arange(half, torch::kFloat32) * -scale).to(w.device());
  const auto args = w1000.unsqueeze(1) * freqs.unsqueeze(0);
  auto emb = torch::cat({torch::sin(args), torch::cos(args)}, 1);
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1});
  return emb;
}

absl::StatusOr<UNet2DConditionModel> LoadUNet(const std::string& dir, bool copy_weights) {
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  ASSIGN_OR_RETURN(JsonConfig json, JsonConfig::Load(config_path));
  ASSIGN_OR_RETURN(UNetConfig cfg, UNetConfig::FromJson(json));
  UNet2DConditionModel unet(cfg);
  LoadOptions opts;
  opts.copy = copy_weights;
  RETURN_IF_ERROR(LoadComponentWeights(*unet, dir, config_path, opts));
  unet->eval();
  return unet;
}

}  // namespace sd
