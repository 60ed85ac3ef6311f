#include "sd/quant/unet_int8.h"

#include <torch/serialize.h>

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "sd/io/safetensors.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::quant {
namespace {

constexpr const char* kMetadataKey = "sdcompress";

std::string ShapeString(c10::IntArrayRef s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// The INT8 kernel of one layer; with `release` the float weight is dropped.
void Install(const QuantLayer& l, QuantizedWeight w, const torch::Tensor& bias, const Affine* input,
             bool release) {
  if (l.conv) {
    l.conv->hook = std::make_shared<Int8Conv2d>(std::move(w), bias, l.conv->options, *input);
  } else {
    l.linear->hook = std::make_shared<Int8Linear>(std::move(w), bias);
  }
  if (release) {
    torch::NoGradGuard no_grad;
    l.weight().set_data(torch::empty({0}, l.weight().options()));
  }
}

// One GEMM and one quantization of x for q, k and v of each self-attention
// whose three projections are INT8 (the INT8 form of fuse_qkv_projections).
void FuseInt8Projections(UNet2DConditionModelImpl& unet) {
  for (auto& m : unet.modules(/*include_self=*/false)) {
    auto* attn = m->as<AttentionImpl>();
    if (attn == nullptr || attn->opt.cross_attention_dim != 0) continue;
    std::vector<std::shared_ptr<Int8Linear>> parts;
    for (auto* lin : {attn->to_q.get(), attn->to_k.get(), attn->to_v.get()}) {
      if (auto k = std::dynamic_pointer_cast<Int8Linear>(lin->hook)) parts.push_back(k);
    }
    if (parts.size() != 3) continue;
    QuantizedWeight w;
    std::vector<torch::Tensor> q, s, b;
    for (auto& p : parts) {
      q.push_back(p->weight().q);
      s.push_back(p->weight().scale);
      if (p->bias().defined()) b.push_back(p->bias());
    }
    w.q = torch::cat(q, 0).contiguous();
    w.scale = torch::cat(s, 0).contiguous();
    attn->fused_hook = std::make_shared<Int8Linear>(
        std::move(w), b.size() == 3 ? torch::cat(b, 0) : torch::Tensor());
  }
}

nlohmann::json LayerHeader(const QuantLayer& l) {
  nlohmann::json j = {
      {"kind", l.conv ? "conv2d" : "linear"},
      {"weight", "int8, symmetric, per output channel: w = weight * weight_scale[o]"}};
  j["activation"] = l.conv ? "uint8, static per tensor (calibrated): x = (q - input_zero_point) * "
                             "input_scale"
                           : "int8, dynamic per token (max|row| / 127), computed at run time";
  return j;
}

// Every tensor of the file: float parameters and buffers by their state_dict
// names, and for each INT8 layer its int8 weight and scales instead of the float weight.
absl::StatusOr<std::pair<safetensors::TensorMap, nlohmann::json>> Int8Tensors(
    UNet2DConditionModelImpl& unet, const Int8Plan& plan) {
  torch::NoGradGuard no_grad;
  auto layers = QuantizableLayers(unet);
  std::map<std::string, const QuantLayer*> by_name;
  for (const auto& l : layers) by_name[l.name] = &l;
  safetensors::TensorMap tensors;
  nlohmann::json header_layers = nlohmann::json::object();
  std::set<std::string> int8_weights;
  auto add_layer = [&](const std::string& name, bool conv) -> absl::Status {
    auto it = by_name.find(name);
    if (it == by_name.end() || (conv != (it->second->conv != nullptr)))
      return absl::InvalidArgumentError(absl::StrCat("INT8 plan names ", conv ? "conv2d" : "linear",
                                                     " layer '", name,
                                                     "', which the UNet has not"));
    const QuantLayer& l = *it->second;
    if (l.weight().numel() == 0)
      return absl::FailedPreconditionError(
          absl::StrCat("layer '", name, "' has no float weight left to quantize"));
    auto w = QuantizeWeightPerChannel(l.weight());
    tensors[name + ".weight"] = w.q.contiguous();
    tensors[name + ".weight_scale"] = w.scale;
    if (conv) {
      const Affine& a = plan.conv_inputs.at(name);
      tensors[name + ".input_scale"] = torch::full({1}, a.scale, torch::kFloat32);
      tensors[name + ".input_zero_point"] = torch::full({1}, a.zero_point, torch::kInt32);
    }
    int8_weights.insert(name + ".weight");
    header_layers[name] = LayerHeader(l);
    return absl::OkStatus();
  };
  for (const auto& [name, a] : plan.conv_inputs) RETURN_IF_ERROR(add_layer(name, true));
  for (const auto& name : plan.linears) RETURN_IF_ERROR(add_layer(name, false));
  for (const auto& item : unet.named_parameters()) {
    if (int8_weights.count(item.key())) continue;
    tensors[item.key()] = item.value().detach().to(torch::kFloat32).contiguous();
  }
  for (const auto& item : unet.named_buffers())
    tensors[item.key()] = item.value().detach().contiguous();
  nlohmann::json header = {{"format", kInt8Format},
                           {"config", unet.config().ToJson()},
                           {"layers", header_layers},
                           {"float_layers", plan.float_layers},
                           {"calibration", plan.calibration}};
  return std::make_pair(std::move(tensors), std::move(header));
}

}  // namespace

std::vector<QuantLayer> QuantizableLayers(UNet2DConditionModelImpl& unet) {
  std::vector<QuantLayer> out;
  for (const auto& item : unet.named_modules("", /*include_self=*/false)) {
    QuantLayer l;
    l.name = item.key();
    l.conv = dynamic_cast<Conv2dImpl*>(item.value().get());
    l.linear = dynamic_cast<LinearImpl*>(item.value().get());
    if (l.conv || l.linear) out.push_back(l);
  }
  return out;
}

std::map<std::string, std::string> RuleFloatLayers(const std::vector<QuantLayer>& layers) {
  std::map<std::string, std::string> out;
  for (const auto& l : layers) {
    if (l.name == "conv_in") {
      out[l.name] = "first convolution (4 input channels: the latents themselves)";
    } else if (l.name == "conv_out") {
      out[l.name] = "last convolution (its output is the noise prediction)";
    } else if (absl::StartsWith(l.name, "time_embedding.")) {
      out[l.name] = "time embedding";
    } else if (absl::EndsWith(l.name, ".time_emb_proj")) {
      out[l.name] = "time embedding projection (one row per sample: INT8 would save nothing)";
    } else if (l.conv && l.conv->options.groups() != 1) {
      out[l.name] = "grouped convolution";
    }
  }
  return out;
}

absl::Status ApplyInt8(UNet2DConditionModelImpl& unet, const Int8Plan& plan,
                       bool release_float_weights) {
  torch::NoGradGuard no_grad;
  if (release_float_weights) unet.fuse_qkv_projections(false);
  std::map<std::string, QuantLayer> by_name;
  for (const auto& l : QuantizableLayers(unet)) by_name[l.name] = l;
  try {
    for (const auto& [name, a] : plan.conv_inputs) {
      auto it = by_name.find(name);
      if (it == by_name.end() || !it->second.conv)
        return absl::InvalidArgumentError(
            absl::StrCat("INT8 plan names conv2d layer '", name, "', which the UNet has not"));
      Install(it->second, QuantizeWeightPerChannel(it->second.weight()), it->second.bias(), &a,
              release_float_weights);
    }
    for (const auto& name : plan.linears) {
      auto it = by_name.find(name);
      if (it == by_name.end() || !it->second.linear)
        return absl::InvalidArgumentError(
            absl::StrCat("INT8 plan names linear layer '", name, "', which the UNet has not"));
      Install(it->second, QuantizeWeightPerChannel(it->second.weight()), it->second.bias(), nullptr,
              release_float_weights);
    }
    FuseInt8Projections(unet);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("installing INT8 kernels: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

void ClearHooks(UNet2DConditionModelImpl& unet) {
  for (const auto& l : QuantizableLayers(unet)) l.hook().reset();
  for (auto& m : unet.modules(false)) {
    if (auto* attn = m->as<AttentionImpl>()) attn->fused_hook.reset();
  }
}

int64_t UNetParameterCount(UNet2DConditionModelImpl& unet) {
  int64_t n = 0;
  for (const auto& p : unet.parameters()) n += p.numel();
  for (const auto& l : QuantizableLayers(unet)) {
    if (l.weight().numel() != 0) continue;  // released: its INT8 kernel holds it
    if (auto k = std::dynamic_pointer_cast<Int8Conv2d>(l.hook())) n += k->weight().q.numel();
    if (auto k = std::dynamic_pointer_cast<Int8Linear>(l.hook())) n += k->weight().q.numel();
  }
  return n;
}

absl::Status SaveUNetInt8(const std::string& path, const std::string& pickle_path,
                          UNet2DConditionModelImpl& unet, const Int8Plan& plan) {
  // Quantized once; both files carry the same tensors and header.
  ASSIGN_OR_RETURN(auto th, Int8Tensors(unet, plan));
  const std::string text = th.second.dump();
  RETURN_IF_ERROR(safetensors::Save(path, th.first, {{kMetadataKey, text}, {"format", "pt"}}));
  if (pickle_path.empty()) return absl::OkStatus();
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, t] : th.first) dict.insert(name, t);
  // torch.load reads tensors and strings alike, but c10::Dict is typed: the
  // header travels as its UTF-8 bytes (bytes(t.tolist()).decode() in Python).
  dict.insert("__header__", torch::tensor(std::vector<uint8_t>(text.begin(), text.end())));
  std::vector<char> bytes;
  try {
    bytes = torch::pickle_save(c10::IValue(dict));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("pickling ", pickle_path, ": ", e.what_without_backtrace()));
  }
  return WriteFileAtomic(pickle_path, std::string(bytes.begin(), bytes.end()));
}

absl::StatusOr<UNet2DConditionModel> LoadUNetInt8(const std::string& path) {
  ASSIGN_OR_RETURN(safetensors::File file, safetensors::File::Open(path));
  auto meta = file.metadata().find(kMetadataKey);
  if (meta == file.metadata().end())
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no \"", kMetadataKey,
                     "\" entry in the safetensors header: not an INT8 UNet file"));
  nlohmann::json header = nlohmann::json::parse(meta->second, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the \"", kMetadataKey, "\" header entry is not a JSON object"));
  if (header.value("format", "") != kInt8Format)
    return absl::InvalidArgumentError(absl::StrCat(path, ": header format is \"",
                                                   header.value("format", ""), "\", expected \"",
                                                   kInt8Format, "\""));
  if (!header.contains("config") || !header["layers"].is_object())
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header lacks \"config\" or its \"layers\" object"));
  ASSIGN_OR_RETURN(UNetConfig cfg,
                   UNetConfig::FromJson(JsonConfig::FromJson(header["config"], path + " header")));
  UNet2DConditionModel unet(cfg);
  unet->eval();
  torch::NoGradGuard no_grad;
  std::map<std::string, QuantLayer> by_name;
  for (const auto& l : QuantizableLayers(*unet)) by_name[l.name] = l;
  std::set<std::string> used;
  auto fetch = [&](const std::string& name, torch::Dtype dtype,
                   const std::vector<int64_t>& shape) -> absl::StatusOr<torch::Tensor> {
    const auto* info = file.Find(name);
    if (info == nullptr)
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' is missing (expected ", ShapeString(shape), ")"));
    if (info->dtype != dtype)
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", name, "' is ", safetensors::DtypeName(info->dtype).value_or("?"),
          ", expected ", safetensors::DtypeName(dtype).value_or("?")));
    if (info->shape != shape)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor '", name, "' has shape ", ShapeString(info->shape),
                       ", but the UNet of its config expects ", ShapeString(shape)));
    used.insert(name);
    return file.Take(name);
  };
  unet->fuse_qkv_projections(false);
  std::set<std::string> int8_weights;
  try {
    for (const auto& [name, layer_header] : header["layers"].items()) {
      auto it = by_name.find(name);
      const std::string kind = layer_header.value("kind", "");
      if (it == by_name.end())
        return absl::InvalidArgumentError(absl::StrCat(path, ": header names INT8 layer '", name,
                                                       "', which the UNet of its config has not"));
      const QuantLayer& l = it->second;
      if (kind != (l.conv ? "conv2d" : "linear"))
        return absl::InvalidArgumentError(absl::StrCat(path, ": header says layer '", name,
                                                       "' is \"", kind, "\", but it is a ",
                                                       l.conv ? "conv2d" : "linear"));
      const auto shape = l.weight().sizes().vec();
      QuantizedWeight w;
      ASSIGN_OR_RETURN(w.q, fetch(name + ".weight", torch::kInt8, shape));
      ASSIGN_OR_RETURN(w.scale, fetch(name + ".weight_scale", torch::kFloat32, {shape[0]}));
      torch::Tensor bias;
      if (l.bias().defined()) {
        ASSIGN_OR_RETURN(bias, fetch(name + ".bias", torch::kFloat32, {shape[0]}));
      }
      Affine a;
      if (l.conv) {
        ASSIGN_OR_RETURN(auto s, fetch(name + ".input_scale", torch::kFloat32, {1}));
        ASSIGN_OR_RETURN(auto zp, fetch(name + ".input_zero_point", torch::kInt32, {1}));
        a.scale = s.item<float>();
        a.zero_point = zp.item<int32_t>();
        if (!(a.scale > 0) || a.zero_point < 0 || a.zero_point > 255)
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": layer '", name, "' has input_scale ", a.scale,
                           " and input_zero_point ", a.zero_point, " (need > 0 and 0..255)"));
      }
      if (bias.defined()) l.bias().copy_(bias);
      Install(l, std::move(w), bias, l.conv ? &a : nullptr, /*release=*/true);
      int8_weights.insert(name + ".weight");
    }
    for (auto& item : unet->named_parameters()) {
      const std::string& name = item.key();
      if (int8_weights.count(name) || used.count(name)) continue;
      ASSIGN_OR_RETURN(auto v, fetch(name, torch::kFloat32, item.value().sizes().vec()));
      item.value().copy_(v);
    }
    for (auto& item : unet->named_buffers()) {
      ASSIGN_OR_RETURN(auto v,
                       fetch(item.key(), item.value().scalar_type(), item.value().sizes().vec()));
      item.value().copy_(v);
    }
    FuseInt8Projections(*unet);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(path, ": ", e.what_without_backtrace()));
  }
  for (const auto& info : file.tensors()) {
    if (!used.count(info.name))
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", info.name,
          "' is neither a parameter of the config's UNet nor part of an INT8 layer in the header"));
  }
  return unet;
}

}  // namespace sd::quant
