#pragma once
// INT8 inference kernels for one Linear or Conv2d, installed as the layer's
// LayerHook. Weights are symmetric int8 per output channel; Linear inputs are
// quantized per token at run time (at::_int_mm), Conv2d inputs with a static
// per-tensor uint8 scale and zero point from calibration
// (onednn::qconv2d_pointwise). Both give float32 out of the int32 accumulator,
// so the residual stream is never rounded to 8 bits.
#include <torch/torch.h>

#include "sd/models/layers.h"

namespace sd::quant {

struct QuantizedWeight {
  torch::Tensor q;      // int8, the float weight's shape
  torch::Tensor scale;  // float32 [out_channels]; w ~= q * scale
};

// Symmetric per output channel (dim 0): scale = max|w| / 127.
QuantizedWeight QuantizeWeightPerChannel(const torch::Tensor& w);

// Static activation quantization: x ~= (q - zero_point) * scale, q in [0, 255].
struct Affine {
  double scale = 1.0;
  int64_t zero_point = 0;
};
// The affine map that covers [lo, hi] (widened to include 0, so zero padding is exact).
Affine AffineForRange(double lo, double hi);

// x (any shape, last dim K, float32) -> int8 rows and one float32 scale per row
// (max|row| / 127), in one pass over x.
void QuantizeRowsSymmetric(const torch::Tensor& x, torch::Tensor& q, torch::Tensor& scale);
// x float32 -> uint8 with round(x / scale) + zero_point, clamped; keeps x's strides.
torch::Tensor QuantizeAffine(const torch::Tensor& x, const Affine& a);

class Int8Linear : public LayerHook {
 public:
  Int8Linear(QuantizedWeight w, torch::Tensor bias);
  torch::Tensor Forward(
      const torch::Tensor& x,
      const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) override;
  const QuantizedWeight& weight() const { return w_; }
  const torch::Tensor& bias() const { return bias_; }

 private:
  QuantizedWeight w_;
  torch::Tensor w_t_;  // [in, out] view of w_.q, the layout _int_mm's second operand wants
  torch::Tensor bias_;
};

class Int8Conv2d : public LayerHook {
 public:
  Int8Conv2d(QuantizedWeight w, torch::Tensor bias,
             const torch::nn::detail::ConvNdOptions<2>& options, Affine input);
  torch::Tensor Forward(
      const torch::Tensor& x,
      const std::function<torch::Tensor(const torch::Tensor&)>& float_forward) override;
  const QuantizedWeight& weight() const { return w_; }
  const torch::Tensor& bias() const { return bias_; }
  const Affine& input() const { return input_; }

 private:
  QuantizedWeight w_;
  torch::Tensor bias_;
  torch::Tensor packed_;  // oneDNN's blocked copy of w_.q
  torch::Tensor zero_points_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_ = 1;
  Affine input_;
};

}  // namespace sd::quant
