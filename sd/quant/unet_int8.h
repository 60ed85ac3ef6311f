#pragma once
// The INT8 UNet: which layers run INT8 and how (the plan), installing the
// kernels into a UNet2DConditionModel, and the unet_int8.safetensors file
// (format in docs/architecture.md "INT8 UNet file").
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "sd/models/unet_2d_condition.h"
#include "sd/quant/int8_kernels.h"

namespace sd::quant {

inline constexpr const char* kInt8Format = "sdcompress.unet_int8/1";

// One Conv2d or Linear of the UNet, by its state_dict prefix.
struct QuantLayer {
  std::string name;
  Conv2dImpl* conv = nullptr;
  LinearImpl* linear = nullptr;
  torch::Tensor& weight() const { return conv ? conv->weight : linear->weight; }
  torch::Tensor& bias() const { return conv ? conv->bias : linear->bias; }
  std::shared_ptr<LayerHook>& hook() const { return conv ? conv->hook : linear->hook; }
};
std::vector<QuantLayer> QuantizableLayers(UNet2DConditionModelImpl& unet);

// Layers that stay floating point whatever calibration says: the first and last
// convolutions and the time embedding (name -> reason).
std::map<std::string, std::string> RuleFloatLayers(const std::vector<QuantLayer>& layers);

struct Int8Plan {
  std::map<std::string, Affine> conv_inputs;              // INT8 convolutions: static input map
  std::vector<std::string> linears;                       // INT8 Linear layers (dynamic per token)
  std::map<std::string, std::string> float_layers;        // name -> why it stays float
  nlohmann::json calibration = nlohmann::json::object();  // how the scales were chosen
};

// Installs INT8 kernels quantized from the layers' own float weights. With
// release_float_weights the float copies are dropped (deployment); without,
// removing the hooks (ClearHooks) gives the float model back (calibration).
absl::Status ApplyInt8(UNet2DConditionModelImpl& unet, const Int8Plan& plan,
                       bool release_float_weights);
void ClearHooks(UNet2DConditionModelImpl& unet);

// Parameters of the UNet, an INT8 layer's weight counted once whichever form it is in.
int64_t UNetParameterCount(UNet2DConditionModelImpl& unet);

// Writes the UNet (float weights, plan) as INT8 safetensors, atomically, and
// unless pickle_path is empty the same tensors as a dict torch.load reads (the
// seed's unet_int8.pt).
absl::Status SaveUNetInt8(const std::string& path, const std::string& pickle_path,
                          UNet2DConditionModelImpl& unet, const Int8Plan& plan);
// Builds the UNet of the file's config with its INT8 kernels installed. Every
// mismatch between header and tensors is an error naming the layer.
absl::StatusOr<UNet2DConditionModel> LoadUNetInt8(const std::string& path);

}  // namespace sd::quant
