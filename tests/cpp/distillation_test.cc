#include "sd/train/distillation.h"

#include <gtest/gtest.h>

#include "tests/cpp/test_configs.h"

namespace sd {
namespace {

// A stand-in for a model: any fixed function of (z, t) will do, since the target
// must make one student step land where two steps of *this* function land.
torch::Tensor FakeModel(const torch::Tensor& z, int64_t t) {
  return torch::tanh(z * 0.7 + static_cast<double>(t) / 1000.0) - 0.1 * z.flip(-1);
}

class DistillationTargetTest : public ::testing::TestWithParam<std::string> {};

// One DDIM step of the 25-step trailing grid with the target output lands exactly
// where the scheduler's own two steps of the 50-step grid land (the grids nest).
TEST_P(DistillationTargetTest, TargetMakesOneStepLandWhereTwoSchedulerStepsLand) {
  const std::string pt = GetParam();
  nlohmann::json extra = {
      {"timestep_spacing", "trailing"}, {"prediction_type", pt}, {"clip_sample", false}};
  if (pt == "v_prediction") extra["rescale_betas_zero_snr"] = true;
  auto fine = MakeScheduler("ddim", testdata::Sd15Scheduler(extra));
  auto coarse = MakeScheduler("ddim", testdata::Sd15Scheduler(extra));
  ASSERT_TRUE(fine.ok() && coarse.ok());
  (*fine)->SetTimesteps(50);
  (*coarse)->SetTimesteps(25);
  torch::manual_seed(0);
  const auto z = torch::randn({1, 4, 8, 8}, torch::kFloat64).to(torch::kFloat32);
  for (size_t i : {0, 5, 24}) {
    const int64_t t = static_cast<int64_t>((*coarse)->timesteps()[i]);
    ASSERT_EQ(t, static_cast<int64_t>((*fine)->timesteps()[2 * i]));
    const int64_t mid = t - 20, end = t - 40;
    auto z_mid = (*fine)->Step(FakeModel(z, t), 2 * i, z);
    auto z_end = (*fine)->Step(FakeModel(z_mid, mid), 2 * i + 1, z_mid);
    // Our general DDIM step agrees with the scheduler's.
    const auto at = NoiseLevelAt(**fine, {t}, torch::kCPU);
    const auto at_mid = NoiseLevelAt(**fine, {mid}, torch::kCPU);
    const auto at_end = NoiseLevelAt(**fine, {end}, torch::kCPU);
    auto ours_mid = DdimStep(pt, FakeModel(z, t), z, at, at_mid);
    EXPECT_LT((ours_mid - z_mid).abs().max().item<double>(), 1e-5) << pt << " t=" << t;
    // The target, stepped once by the coarse scheduler, lands on z_end.
    auto target = DdimStepTarget(pt, z, z_end, at, at_end);
    auto once = (*coarse)->Step(target, i, z);
    const double tol = pt == "epsilon" && t == 999 ? 1e-3 : 1e-4;
    EXPECT_LT((once - z_end).abs().max().item<double>(), tol) << pt << " t=" << t;
  }
}

INSTANTIATE_TEST_SUITE_P(Parameterisations, DistillationTargetTest,
                         ::testing::Values("epsilon", "v_prediction", "sample"));

TEST(DistillationTest, TruncatedSnrWeightsAreMaxSnrOneOnTheSampleError) {
  auto s = MakeScheduler("ddim", testdata::Sd15Scheduler({{"clip_sample", false}}));
  ASSERT_TRUE(s.ok());
  const std::vector<int64_t> t = {10, 500, 990};
  const auto at = NoiseLevelAt(**s, t, torch::kCPU);
  torch::manual_seed(1);
  const auto z = torch::randn({3, 4, 4, 4});
  const auto out = torch::randn({3, 4, 4, 4}), target = torch::randn({3, 4, 4, 4});
  const auto snr = (at.alpha.pow(2) / at.sigma.pow(2)).flatten();
  for (const std::string pt : {"epsilon", "v_prediction", "sample"}) {
    const auto dx = PredictedSample(pt, out, z, at) - PredictedSample(pt, target, z, at);
    const auto want = torch::clamp_min(snr, 1.0) * dx.pow(2).mean({1, 2, 3});
    const auto got = TruncatedSnrWeights(pt, at) * (out - target).pow(2).mean({1, 2, 3});
    EXPECT_TRUE(torch::allclose(got, want, 1e-4, 1e-6)) << pt << got << want;
  }
}

TEST(DistillationTest, AttentionMapLossIsZeroOnlyForEqualMaps) {
  torch::manual_seed(2);
  const auto p = torch::softmax(torch::randn({2, 4, 16, 8}), -1);
  const auto q = torch::softmax(torch::randn({2, 4, 16, 8}), -1);
  EXPECT_NEAR(AttentionMapLoss({p}, {p}).item<double>(), 0, 1e-7);
  EXPECT_GT(AttentionMapLoss({q, p}, {p, p}).item<double>(), 1e-3);
}

}  // namespace
}  // namespace sd
