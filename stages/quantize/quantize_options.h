#pragma once
// Options of the quantize stage (job.yaml section `quantize:`).
#include <cstdint>
#include <string>

namespace sd::stages {

struct QuantizeOptions {
  // The floating-point precision of every component's weights: fp16 (the
  // seed's default, "2x memory reduction") or bf16 (fp32's range, for CPUs and
  // for models whose activations overflow fp16).
  std::string dtype = "fp16";
  // Also an INT8 UNet (unet_int8.safetensors + unet_int8.pt), calibrated on the
  // dataset's captions; needs `dataset`.
  bool int8 = true;
  int64_t calibration_samples = 100;  // the seed's INT8_CALIBRATION_SAMPLES
  int64_t heldout_prompts = 8;        // beside them: the clipping method is chosen on these
  // The sampling steps calibration runs (the model's own); 0: its distillation.json's
  // step count, or 50 for an undistilled model.
  int64_t calibration_steps = 0;
  double guidance_scale = 7.5;
  std::string scheduler = "default";
  std::string clipping =
      "auto";  // auto (the best of the three, measured) | absmax | percentile | mse
  double min_layer_sqnr_db = 20;  // a layer whose INT8 output is noisier stays float
  int64_t calibration_batch = 8;  // prompts per pipeline call
  // false: only the Linear layers go INT8 (the scope of quantize_dynamic and
  // torchao); 8-bit activations over all 96 convolutions of SD1.5 cost about
  // 6x the output error (docs/architecture.md, Quantization).
  bool int8_convolutions = true;
};

}  // namespace sd::stages
