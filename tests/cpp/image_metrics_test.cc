#include "sd/eval/image_metrics.h"

#include <gtest/gtest.h>

#include <cmath>

#include "sd/eval/shape_probe.h"

namespace sd::eval {
namespace {

TEST(ImageMetricsTest, PsnrOfAKnownError) {
  auto a = torch::full({2, 16, 16, 3}, 0.5, torch::kFloat64);
  auto b = a + 0.1;  // MSE 0.01 -> 20 dB
  auto p = Psnr(a, b);
  EXPECT_NEAR(p[0].item<double>(), 20.0, 1e-9);
  EXPECT_NEAR(p[1].item<double>(), 20.0, 1e-9);
  EXPECT_TRUE(std::isinf(Psnr(a, a)[0].item<double>()));
  EXPECT_NEAR(MeanSquaredError(a, b)[0].item<double>(), 0.01, 1e-12);
}

TEST(ImageMetricsTest, SsimOfKnownImages) {
  torch::manual_seed(0);
  auto noise = torch::rand({1, 32, 32, 3});
  EXPECT_NEAR(Ssim(noise, noise)[0].item<double>(), 1.0, 1e-12);
  // Two flat images: only the luminance term remains, (2ab + C1) / (a^2 + b^2 + C1).
  auto a = torch::full({1, 3, 20, 20}, 0.5, torch::kFloat64);
  auto b = torch::full({1, 3, 20, 20}, 0.7, torch::kFloat64);
  const double c1 = 1e-4;
  EXPECT_NEAR(Ssim(a, b)[0].item<double>(), (2 * 0.35 + c1) / (0.25 + 0.49 + c1), 1e-12);
  // Independent noise is far from similar; the same noise slightly shifted in value is close.
  auto other = torch::rand({1, 32, 32, 3});
  EXPECT_LT(Ssim(noise, other)[0].item<double>(), 0.1);
  EXPECT_GT(Ssim(noise, (noise * 0.98 + 0.01))[0].item<double>(), 0.98);
}

TEST(ShapeProbeTest, LabelsComeFromSingleShapeMetadata) {
  auto meta = nlohmann::json::parse(
      R"({"objects": [{"shape": "star", "color": "blue", "size": "small", "position": "top right"}],
          "background": "gray"})");
  auto l = ProbeLabels(meta);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ((*l)[0], 3);  // star
  EXPECT_EQ((*l)[1], 2);  // blue
  EXPECT_EQ((*l)[2], 2);  // top right
  EXPECT_EQ((*l)[3], 1);  // gray
  meta["objects"].push_back(meta["objects"][0]);
  EXPECT_EQ(ProbeLabels(meta).status().code(), absl::StatusCode::kNotFound);
  auto bad = nlohmann::json::parse(R"({"objects": [{"shape": "hexagon", "color": "blue",
      "position": "top"}], "background": "gray"})");
  EXPECT_NE(ProbeLabels(bad).status().message().find("shape"), std::string::npos);
  auto pred = torch::tensor({{0, 1, 2, 3}, {0, 1, 0, 0}});
  auto acc = Accuracy(pred, torch::tensor({{0, 1, 2, 3}, {1, 1, 2, 0}}));
  EXPECT_DOUBLE_EQ(acc[0], 0.5);
  EXPECT_DOUBLE_EQ(acc[1], 1.0);
  EXPECT_DOUBLE_EQ(acc[2], 0.5);
  EXPECT_DOUBLE_EQ(acc[3], 1.0);
}

}  // namespace
}  // namespace sd::eval
