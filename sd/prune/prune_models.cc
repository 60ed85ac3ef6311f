#include "sd/prune/prune_models.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/clip_text_model.h"
#include "sd/models/layers.h"
#include "sd/models/unet_2d_condition.h"
#include "sd/prune/channel_graph.h"
#include "sd/util/status_macros.h"

namespace sd::prune {
namespace {

using safetensors::TensorMap;

int64_t CountParameters(const TensorMap& w) {
  int64_t n = 0;
  for (const auto& [name, t] : w) n += t.numel();
  return n;
}

// The kept width of one block_out_channels entry: whole GroupNorm groups of the
// nearest size to (1 - ratio) of the old (ties: the wider), divisible by the
// block's attention heads (heads 0: none).
absl::StatusOr<int64_t> KeptWidth(const std::string& component, const std::string& block,
                                  int64_t channels, int64_t groups, int64_t heads, double ratio) {
  const int64_t size = channels / groups;
  const double target = static_cast<double>(size) * (1.0 - ratio);
  if (target < 0.5)
    return absl::InvalidArgumentError(absl::StrCat(
        component, ": ratio ", ratio, " would leave ", block, "'s ", groups,
        " GroupNorm groups of ", size, " channels empty (", target, " channels each)"));
  int64_t best = 0;
  for (int64_t k = 1; k <= size; ++k) {
    if (heads > 0 && (groups * k) % heads != 0) continue;
    if (best == 0 || std::abs(k - target) <= std::abs(best - target)) best = k;
  }
  if (best == 0)
    return absl::InvalidArgumentError(
        absl::StrCat(component, ": ", block, " (", channels, " channels) has no width of whole ",
                     groups, " GroupNorm groups that its ", heads, " attention heads divide"));
  return groups * best;
}

// Builds the graph of the blocks the UNet and the VAE share. Widths are per
// level (one block_out_channels entry): its channels and what it keeps.
class BlockGraph {
 public:
  BlockGraph(const TensorMap& w, int64_t groups) : w_(w), groups_(groups) {}
  ChannelGraph g;

  int Stream(const std::string& name, int64_t c, int64_t kept) {
    return g.AddStream(name, c, groups_, kept / groups_);
  }

  // A 3x3 or 1x1 conv reading `in` and writing a new stream (or `out` >= 0).
  int Conv(const std::string& p, const std::vector<int>& in, int64_t c, int64_t kept,
           int out = -1) {
    if (out < 0) out = Stream(p, c, kept);
    if (!in.empty()) g.Use(p + ".weight", 1, in);
    g.Use(p + ".weight", 0, out);
    g.Use(p + ".bias", 0, out);
    return out;
  }

  // ResnetBlock2D over the concatenation `in`; returns its output stream: a new
  // one with a shortcut conv, else the input's (the residual add couples them).
  absl::StatusOr<int> Resnet(const std::string& p, const std::vector<int>& in, int64_t c,
                             int64_t kept) {
    GroupNormOver(p + ".norm1", in);
    const int inner = Conv(p + ".conv1", in, c, kept);
    if (w_.contains(p + ".time_emb_proj.weight")) {
      g.Use(p + ".time_emb_proj.weight", 0, inner);
      g.Use(p + ".time_emb_proj.bias", 0, inner);
    }
    GroupNormOver(p + ".norm2", {inner});
    if (w_.contains(p + ".conv_shortcut.weight")) {
      const int out = Conv(p + ".conv2", {inner}, c, kept);
      Conv(p + ".conv_shortcut", in, c, kept, out);
      return out;
    }
    if (in.size() != 1)
      return absl::InvalidArgumentError(
          absl::StrCat(p,
                       " adds its concatenated input to its output without conv_shortcut: "
                       "the pruner cannot keep that consistent"));
    Conv(p + ".conv2", {inner}, c, kept, in[0]);
    return in[0];
  }

  // diffusers' Attention over stream x (self-attention, or cross-attention when
  // `cross`: keys and values read the unpruned text states). Query/key and
  // value/output are their own channel spaces, kept per head; the query is
  // rescaled so that q.k / sqrt(new head dim) is the old logit.
  void Attention(const std::string& p, int x, int64_t c, int64_t kept, int64_t heads, bool cross,
                 bool qkv_bias) {
    const int qk = g.AddStream(p + ".to_q/to_k", c, heads, kept / heads);
    const int v = g.AddStream(p + ".to_v/to_out", c, heads, kept / heads);
    g.Use(p + ".to_q.weight", 0, qk);
    g.Use(p + ".to_q.weight", 1, x);
    g.Use(p + ".to_k.weight", 0, qk);
    g.Use(p + ".to_v.weight", 0, v);
    if (!cross) {
      g.Use(p + ".to_k.weight", 1, x);
      g.Use(p + ".to_v.weight", 1, x);
    }
    if (qkv_bias) {
      g.Use(p + ".to_q.bias", 0, qk);
      g.Use(p + ".to_k.bias", 0, qk);
      g.Use(p + ".to_v.bias", 0, v);
    }
    g.Use(p + ".to_out.0.weight", 1, v);
    g.Use(p + ".to_out.0.weight", 0, x);
    g.Use(p + ".to_out.0.bias", 0, x);
    query_scales_.emplace_back(p + ".to_q", std::sqrt(static_cast<double>(kept) / c));
  }

  // Transformer2DModel on stream x (residual: its output is x).
  void Transformer(const std::string& p, int x, int64_t c, int64_t kept, int64_t heads,
                   int64_t layers) {
    GroupNormOver(p + ".norm", {x});
    const int inner = g.AddStream(p + ".proj_in", c, 1, kept);
    g.Use(p + ".proj_in.weight", 1, x);
    g.Use(p + ".proj_in.weight", 0, inner);
    g.Use(p + ".proj_in.bias", 0, inner);
    for (int64_t k = 0; k < layers; ++k) {
      const std::string b = absl::StrCat(p, ".transformer_blocks.", k);
      for (const char* n : {".norm1", ".norm2", ".norm3"}) g.UseNorm(b + n, inner);
      Attention(b + ".attn1", inner, c, kept, heads, false, false);
      Attention(b + ".attn2", inner, c, kept, heads, true, false);
      // GEGLU: proj's rows are [value; gate] of the same hidden units.
      const int ff = g.AddStream(b + ".ff", 4 * c, 1, 4 * kept);
      g.Use(b + ".ff.net.0.proj.weight", 0, {ff, ff});
      g.Use(b + ".ff.net.0.proj.bias", 0, {ff, ff});
      g.Use(b + ".ff.net.0.proj.weight", 1, inner);
      g.Use(b + ".ff.net.2.weight", 1, ff);
      g.Use(b + ".ff.net.2.weight", 0, inner);
      g.Use(b + ".ff.net.2.bias", 0, inner);
    }
    g.Use(p + ".proj_out.weight", 1, inner);
    g.Use(p + ".proj_out.weight", 0, x);
    g.Use(p + ".proj_out.bias", 0, x);
  }

  void GroupNormOver(const std::string& p, const std::vector<int>& in) {
    g.GroupNorm(p, in, groups_);
    g.Use(p + ".weight", 0, in);
    g.Use(p + ".bias", 0, in);
  }

  // Cuts the weights and rescales the queries.
  absl::StatusOr<TensorMap> Apply(const TensorMap& w, nlohmann::json& map) const {
    ASSIGN_OR_RETURN(TensorMap out, g.Apply(w));
    map = g.Map();
    for (const auto& [p, s] : query_scales_) {
      for (const char* suffix : {".weight", ".bias"}) {
        auto it = out.find(p + suffix);
        if (it == out.end()) continue;
        it->second = it->second * s;
        map[p + suffix]["scale"] = s;
      }
    }
    return out;
  }

 private:
  const TensorMap& w_;
  int64_t groups_;
  std::vector<std::pair<std::string, double>> query_scales_;
};

// One ratio per block_out_channels level: a single value applies to all.
absl::StatusOr<std::vector<double>> LevelRatios(const std::string& component,
                                                const std::vector<double>& ratios, size_t levels) {
  if (ratios.size() == 1) return std::vector<double>(levels, ratios[0]);
  if (ratios.size() != levels)
    return absl::InvalidArgumentError(
        absl::StrCat(component, ": ", ratios.size(), " ratios given, but block_out_channels has ",
                     levels, " levels (give one ratio, or one per level)"));
  return ratios;
}

nlohmann::json LevelReport(const std::vector<int64_t>& old_ch, const std::vector<int64_t>& new_ch,
                           const std::vector<double>& ratio) {
  nlohmann::json levels = nlohmann::json::array();
  for (size_t i = 0; i < old_ch.size(); ++i) {
    levels.push_back({{"block_out_channels", i},
                      {"channels", old_ch[i]},
                      {"kept", new_ch[i]},
                      {"ratio_asked", ratio[i]},
                      {"ratio_reached", 1.0 - static_cast<double>(new_ch[i]) / old_ch[i]}});
  }
  return levels;
}

// The slowest sinusoidal features are nearly constant over 0..999, so nearly
// collinear with each other and the bias: plain least squares fits them with
// coefficients of 1e6 that cancel only in double precision (and wreck any
// later training). A ridge term of 1e-3 of the largest squared singular value
// keeps the coefficients at the scale of the original weights; measured on the
// toy teacher it costs 4 points of time-embedding error (7.5% -> 11.7%).
constexpr double kRidge = 1e-3;

torch::Tensor Ridge(const torch::Tensor& A, const torch::Tensor& y) {
  const auto gram = torch::matmul(A.t(), A);
  const double top = torch::linalg_svdvals(A).max().item<double>();
  const auto eye = torch::eye(A.size(1), A.options());
  return torch::linalg_solve(gram + kRidge * top * top * eye, torch::matmul(A.t(), y));
}

// diffusers derives the sinusoidal timestep features' width from
// block_out_channels[0], so a pruned first block changes them. linear_1 (and
// cond_proj, which adds into the features) is refitted by least squares over
// all 1000 training timesteps so the time embedding stays the old one.
absl::StatusOr<nlohmann::json> RefitTimeEmbedding(const UNetConfig& cfg, int64_t new_width,
                                                  TensorMap& w) {
  const int64_t old_width = cfg.block_out_channels[0];
  auto W1 = w.at("time_embedding.linear_1.weight").to(torch::kFloat64);
  auto b1 = w.at("time_embedding.linear_1.bias").to(torch::kFloat64);
  auto W2 = w.at("time_embedding.linear_2.weight").to(torch::kFloat64);
  auto b2 = w.at("time_embedding.linear_2.bias").to(torch::kFloat64);
  const auto t = torch::arange(0, 1000, torch::kFloat32);
  const auto s_old =
      TimestepEmbedding(t, old_width, cfg.flip_sin_to_cos, cfg.freq_shift).to(torch::kFloat64);
  const auto s_new =
      TimestepEmbedding(t, new_width, cfg.flip_sin_to_cos, cfg.freq_shift).to(torch::kFloat64);
  const auto y = torch::matmul(s_old, W1.t()) + b1;
  const auto A = torch::cat({s_new, torch::ones({1000, 1}, torch::kFloat64)}, 1);
  const auto dtype = w.at("time_embedding.linear_1.weight").scalar_type();
  const auto X = Ridge(A, y).to(dtype).to(torch::kFloat64);
  const auto W1n = X.slice(0, 0, new_width).t().contiguous();
  const auto b1n = X.select(0, new_width).contiguous();
  const auto y_new = torch::matmul(A, X);  // with the weights as stored
  const auto e_old = torch::matmul(torch::silu(y), W2.t()) + b2;
  const auto e_new = torch::matmul(torch::silu(y_new), W2.t()) + b2;
  const auto row_err = (e_new - e_old).norm(2, 1) / e_old.norm(2, 1).clamp_min(1e-12);
  nlohmann::json r = {
      {"tensor", "time_embedding.linear_1.weight"},
      {"fit", absl::StrCat("ridge least squares over timesteps 0..999, lambda ", kRidge,
                           " x the largest squared singular value")},
      {"features", {old_width, new_width}},
      {"linear_1_relative_error", ((y_new - y).norm() / y.norm()).item<double>()},
      {"time_embedding_relative_error", ((e_new - e_old).norm() / e_old.norm()).item<double>()},
      {"time_embedding_max_relative_error", row_err.max().item<double>()}};
  w["time_embedding.linear_1.weight"] = W1n.to(dtype);
  w["time_embedding.linear_1.bias"] = b1n.to(dtype);
  if (auto it = w.find("time_embedding.cond_proj.weight"); it != w.end()) {
    // linear_1(s + P g) = W1 s + W1 P g: P' solves W1' P' = W1 P.
    const auto target = torch::matmul(W1, it->second.to(torch::kFloat64));
    const auto P = Ridge(W1n, target).to(it->second.scalar_type()).to(torch::kFloat64);
    r["cond_proj_relative_error"] =
        ((torch::matmul(W1n, P) - target).norm() / target.norm().clamp_min(1e-12)).item<double>();
    it->second = P.to(it->second.scalar_type()).contiguous();
  }
  return r;
}

}  // namespace

absl::StatusOr<PrunedComponent> PruneUNet(const nlohmann::json& config, const TensorMap& w,
                                          const std::vector<double>& ratios,
                                          const std::string& origin) {
  ASSIGN_OR_RETURN(UNetConfig cfg, UNetConfig::FromJson(JsonConfig::FromJson(config, origin)));
  const auto& ch = cfg.block_out_channels;
  const size_t n = ch.size();
  ASSIGN_OR_RETURN(const std::vector<double> ratio, LevelRatios("unet", ratios, n));
  const int64_t G = cfg.norm_num_groups;
  std::vector<int64_t> kept(n);
  for (size_t i = 0; i < n; ++i) {
    const bool attn = cfg.down_block_types[i].rfind("CrossAttn", 0) == 0 ||
                      cfg.up_block_types[n - 1 - i].rfind("CrossAttn", 0) == 0 ||
                      (cfg.mid_block && i == n - 1);
    ASSIGN_OR_RETURN(kept[i], KeptWidth("unet", absl::StrCat("down_blocks.", i), ch[i], G,
                                        attn ? cfg.num_attention_heads[i] : 0, ratio[i]));
  }
  BlockGraph b(w, G);
  nlohmann::json features = nlohmann::json::object();
  std::vector<std::pair<std::string, int>> feature_streams;
  int cur = b.Conv("conv_in", {}, ch[0], kept[0]);
  std::vector<int> skips = {cur};
  for (size_t i = 0; i < n; ++i) {
    const std::string p = absl::StrCat("down_blocks.", i);
    const bool cross = cfg.down_block_types[i].rfind("CrossAttn", 0) == 0;
    for (int64_t j = 0; j < cfg.layers_per_block; ++j) {
      ASSIGN_OR_RETURN(cur, b.Resnet(absl::StrCat(p, ".resnets.", j), {cur}, ch[i], kept[i]));
      if (cross)
        b.Transformer(absl::StrCat(p, ".attentions.", j), cur, ch[i], kept[i],
                      cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i]);
      skips.push_back(cur);
    }
    if (i + 1 < n) {
      cur = b.Conv(p + ".downsamplers.0.conv", {cur}, ch[i], kept[i]);
      skips.push_back(cur);
    }
    feature_streams.emplace_back(p, cur);
  }
  if (cfg.mid_block) {
    ASSIGN_OR_RETURN(cur, b.Resnet("mid_block.resnets.0", {cur}, ch.back(), kept.back()));
    b.Transformer("mid_block.attentions.0", cur, ch.back(), kept.back(),
                  cfg.num_attention_heads.back(), cfg.transformer_layers_per_block.back());
    ASSIGN_OR_RETURN(cur, b.Resnet("mid_block.resnets.1", {cur}, ch.back(), kept.back()));
    feature_streams.emplace_back("mid_block", cur);
  }
  for (size_t i = 0; i < n; ++i) {
    const size_t level = n - 1 - i;
    const std::string p = absl::StrCat("up_blocks.", i);
    const bool cross = cfg.up_block_types[i].rfind("CrossAttn", 0) == 0;
    for (int64_t j = 0; j < cfg.layers_per_block + 1; ++j) {
      const int skip = skips.back();
      skips.pop_back();
      ASSIGN_OR_RETURN(
          cur, b.Resnet(absl::StrCat(p, ".resnets.", j), {cur, skip}, ch[level], kept[level]));
      if (cross)
        b.Transformer(absl::StrCat(p, ".attentions.", j), cur, ch[level], kept[level],
                      cfg.num_attention_heads[level], cfg.transformer_layers_per_block[level]);
    }
    if (i + 1 < n) cur = b.Conv(p + ".upsamplers.0.conv", {cur}, ch[level], kept[level]);
    feature_streams.emplace_back(p, cur);
  }
  b.GroupNormOver("conv_norm_out", {cur});
  b.g.Use("conv_out.weight", 1, cur);
  // The time embedding keeps its width (time_embedding_dim); only linear_1's
  // input, the sinusoidal features, follows block_out_channels[0] (refitted).
  RETURN_IF_ERROR(b.g.Select(w, "unet"));
  PrunedComponent r;
  ASSIGN_OR_RETURN(r.weights, b.Apply(w, r.map));
  // A first block kept whole keeps the features: nothing to refit (a ridge fit
  // of the same features would only add its own error).
  nlohmann::json refit = "none: block_out_channels[0] kept whole";
  if (kept[0] != ch[0]) {
    ASSIGN_OR_RETURN(refit, RefitTimeEmbedding(cfg, kept[0], r.weights));
    r.map["time_embedding.linear_1.weight"]["refit"] = refit["fit"];
    r.map["time_embedding.linear_1.bias"]["refit"] = refit["fit"];
    if (r.weights.contains("time_embedding.cond_proj.weight"))
      r.map["time_embedding.cond_proj.weight"]["refit"] = refit["fit"];
  }
  for (const auto& [name, s] : feature_streams) features[name] = b.g.kept(s);
  r.features = features;
  r.config = config;
  r.config["block_out_channels"] = kept;
  r.config["time_embedding_dim"] = cfg.temb_dim();
  r.report = {
      {"levels", LevelReport(ch, kept, ratio)},
      {"parameters", {{"before", CountParameters(w)}, {"after", CountParameters(r.weights)}}},
      {"time_embedding_refit", refit},
      {"group_norms", b.g.GroupNormReport()}};
  return r;
}

absl::StatusOr<PrunedComponent> PruneVAE(const nlohmann::json& config, const TensorMap& w,
                                         const std::vector<double>& ratios,
                                         const std::string& origin) {
  ASSIGN_OR_RETURN(VAEConfig cfg, VAEConfig::FromJson(JsonConfig::FromJson(config, origin)));
  const auto& ch = cfg.block_out_channels;
  const size_t n = ch.size();
  ASSIGN_OR_RETURN(const std::vector<double> ratio, LevelRatios("vae", ratios, n));
  const int64_t G = cfg.norm_num_groups;
  std::vector<int64_t> kept(n);
  for (size_t i = 0; i < n; ++i) {
    // The mid block's single attention head spans the whole width: no constraint.
    ASSIGN_OR_RETURN(kept[i], KeptWidth("vae", absl::StrCat("block_out_channels[", i, "]"), ch[i],
                                        G, 0, ratio[i]));
  }
  BlockGraph b(w, G);
  auto mid = [&](const std::string& p, int x) -> absl::StatusOr<int> {
    ASSIGN_OR_RETURN(x, b.Resnet(p + ".resnets.0", {x}, ch.back(), kept.back()));
    if (cfg.mid_block_add_attention) {
      const std::string a = p + ".attentions.0";
      b.GroupNormOver(a + ".group_norm", {x});
      b.Attention(a, x, ch.back(), kept.back(), 1, false, true);
    }
    return b.Resnet(p + ".resnets.1", {x}, ch.back(), kept.back());
  };
  // Encoder: the latent side (conv_out's rows, quant_conv) is untouched.
  int cur = b.Conv("encoder.conv_in", {}, ch[0], kept[0]);
  for (size_t i = 0; i < n; ++i) {
    const std::string p = absl::StrCat("encoder.down_blocks.", i);
    for (int64_t j = 0; j < cfg.layers_per_block; ++j) {
      ASSIGN_OR_RETURN(cur, b.Resnet(absl::StrCat(p, ".resnets.", j), {cur}, ch[i], kept[i]));
    }
    if (i + 1 < n) cur = b.Conv(p + ".downsamplers.0.conv", {cur}, ch[i], kept[i]);
  }
  ASSIGN_OR_RETURN(cur, mid("encoder.mid_block", cur));
  b.GroupNormOver("encoder.conv_norm_out", {cur});
  b.g.Use("encoder.conv_out.weight", 1, cur);
  // Decoder: conv_in reads the latents (columns untouched).
  cur = b.Stream("decoder.conv_in", ch.back(), kept.back());
  b.g.Use("decoder.conv_in.weight", 0, cur);
  b.g.Use("decoder.conv_in.bias", 0, cur);
  ASSIGN_OR_RETURN(cur, mid("decoder.mid_block", cur));
  for (size_t i = 0; i < n; ++i) {
    const size_t level = n - 1 - i;
    const std::string p = absl::StrCat("decoder.up_blocks.", i);
    for (int64_t j = 0; j < cfg.layers_per_block + 1; ++j) {
      ASSIGN_OR_RETURN(cur,
                       b.Resnet(absl::StrCat(p, ".resnets.", j), {cur}, ch[level], kept[level]));
    }
    if (i + 1 < n) cur = b.Conv(p + ".upsamplers.0.conv", {cur}, ch[level], kept[level]);
  }
  b.GroupNormOver("decoder.conv_norm_out", {cur});
  b.g.Use("decoder.conv_out.weight", 1, cur);
  RETURN_IF_ERROR(b.g.Select(w, "vae"));
  PrunedComponent r;
  ASSIGN_OR_RETURN(r.weights, b.Apply(w, r.map));
  r.config = config;
  r.config["block_out_channels"] = kept;
  r.report = {
      {"levels", LevelReport(ch, kept, ratio)},
      {"parameters", {{"before", CountParameters(w)}, {"after", CountParameters(r.weights)}}},
      {"latent_channels", cfg.latent_channels},
      {"group_norms", b.g.GroupNormReport()}};
  return r;
}

absl::StatusOr<PrunedComponent> PruneTextEncoder(const nlohmann::json& config, const TensorMap& w,
                                                 double ratio, const std::string& origin) {
  ASSIGN_OR_RETURN(CLIPTextConfig cfg,
                   CLIPTextConfig::FromJson(JsonConfig::FromJson(config, origin)));
  const int64_t inner = cfg.intermediate_size;
  const double target = static_cast<double>(inner) * (1.0 - ratio);
  if (target < 0.5)
    return absl::InvalidArgumentError(absl::StrCat("text_encoder: ratio ", ratio,
                                                   " would leave the MLPs (intermediate_size ",
                                                   inner, ") with no neuron"));
  const int64_t keep = std::max<int64_t>(1, std::llround(target));
  ChannelGraph g;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("text_model.encoder.layers.", l, ".mlp");
    const int s = g.AddStream(p, inner, 1, keep);
    g.Use(p + ".fc1.weight", 0, s);
    g.Use(p + ".fc1.bias", 0, s);
    g.Use(p + ".fc2.weight", 1, s);
  }
  RETURN_IF_ERROR(g.Select(w, "text_encoder"));
  PrunedComponent r;
  ASSIGN_OR_RETURN(r.weights, g.Apply(w));
  r.map = g.Map();
  r.config = config;
  r.config["intermediate_size"] = keep;
  r.report = {
      {"intermediate_size", {{"before", inner}, {"after", keep}}},
      {"ratio_asked", ratio},
      {"ratio_reached", 1.0 - static_cast<double>(keep) / inner},
      {"parameters", {{"before", CountParameters(w)}, {"after", CountParameters(r.weights)}}}};
  return r;
}

}  // namespace sd::prune
