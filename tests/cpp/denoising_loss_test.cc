#include "sd/train/denoising_loss.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <array>
#include <set>

#include "tests/cpp/test_configs.h"

namespace sd {
namespace {

// Fractions of 4000 draws below t = 250 / 500 / 750 of T = 1000.
std::array<double, 3> Quartiles(const TimestepSampling& sampling) {
  at::Generator gen = at::detail::createCPUGenerator(7);
  std::array<double, 3> below{};
  for (int i = 0; i < 4000; ++i) {
    const int64_t t = SampleTimestep(sampling, 1000, gen);
    EXPECT_GE(t, 0);
    EXPECT_LT(t, 1000);
    for (int q = 0; q < 3; ++q) below[q] += t < 250 * (q + 1) ? 1.0 / 4000 : 0;
  }
  return below;
}

TEST(SampleTimestepTest, UniformAndLogitNormalFollowTheirDistributions) {
  const auto u = Quartiles({});
  EXPECT_NEAR(u[0], 0.25, 0.03);
  EXPECT_NEAR(u[1], 0.50, 0.03);
  EXPECT_NEAR(u[2], 0.75, 0.03);
  // logit(t / T) ~ N(1, 1): P(t < 500) = P(z < -1) = 0.159; P(t < 750) = P(z < ln 3 - 1) = 0.540;
  // P(t < 250) = P(z < -ln 3 - 1) = 0.018.
  const auto l = Quartiles({.logit_normal = true, .logit_mean = 1, .logit_std = 1});
  EXPECT_NEAR(l[0], 0.018, 0.01);
  EXPECT_NEAR(l[1], 0.159, 0.02);
  EXPECT_NEAR(l[2], 0.540, 0.03);
}

std::unique_ptr<Scheduler> Ddim(const std::string& prediction_type, bool zero_snr) {
  auto s = MakeScheduler("ddim", testdata::Sd15Scheduler({{"prediction_type", prediction_type},
                                                          {"rescale_betas_zero_snr", zero_snr}}));
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(*s);
}

TEST(MinSnrWeightsTest, ClipsTheCleanLatentWeightAtGamma) {
  const auto t = torch::tensor({0, 300, 600, 999}, torch::kLong);
  for (const bool zero_snr : {false, true}) {
    auto v = Ddim("v_prediction", zero_snr);
    auto eps = Ddim("epsilon", zero_snr);
    const auto ac = v->alphas_cumprod().index_select(0, t).to(torch::kDouble);
    const auto snr = ac / (1 - ac);
    const auto wv = MinSnrWeights(*v, t, 5.0);
    const auto we = MinSnrWeights(*eps, t, 5.0);
    ASSERT_EQ(wv.sizes(), (std::vector<int64_t>{4}));
    for (int i = 0; i < 4; ++i) {
      const double s = snr[i].item<double>();
      EXPECT_NEAR(wv[i].item<double>(), std::min(s + 1, 5.0) / (s + 1), 1e-5) << "t index " << i;
      if (s > 0) {
        EXPECT_NEAR(we[i].item<double>(), std::min(s, 5.0) / s, 1e-5) << "t index " << i;
      }
    }
    // The low-noise end is turned down, the high-noise end keeps its weight.
    EXPECT_LT(wv[0].item<double>(), 0.01);
    EXPECT_DOUBLE_EQ(wv[3].item<double>(), 1.0);
  }
  // A zero-SNR last step keeps full weight for v (diffusers' form would give it 0).
  EXPECT_DOUBLE_EQ(
      MinSnrWeights(*Ddim("v_prediction", true), torch::tensor({999}), 5.0).item<double>(), 1.0);
  EXPECT_TRUE(torch::equal(MinSnrWeights(*Ddim("sample", false), t, 5.0), torch::ones({4})));
}

TEST(DenoisingLossTest, SampleWeightsScaleEachSamplesError) {
  torch::manual_seed(0);
  auto unet_cfg = UNetConfig::FromJson(JsonConfig::FromJson(testdata::TinyUNet(), "config.json"));
  ASSERT_TRUE(unet_cfg.ok()) << unet_cfg.status();
  UNet2DConditionModel unet(*unet_cfg);
  auto s = Ddim("v_prediction", true);
  const auto lat = torch::randn({2, 4, 8, 8}), noise = torch::randn({2, 4, 8, 8});
  const auto t = torch::tensor({100, 700}, torch::kLong), ctx = torch::randn({2, 3, 32});
  torch::NoGradGuard ng;
  const auto l0 = DenoisingLoss(unet, *s, lat.narrow(0, 0, 1), noise.narrow(0, 0, 1),
                                t.narrow(0, 0, 1), ctx.narrow(0, 0, 1));
  const auto l1 = DenoisingLoss(unet, *s, lat.narrow(0, 1, 1), noise.narrow(0, 1, 1),
                                t.narrow(0, 1, 1), ctx.narrow(0, 1, 1));
  const auto both = DenoisingLoss(unet, *s, lat, noise, t, ctx, {}, torch::tensor({0.25, 2.0}));
  EXPECT_NEAR(both.item<double>(), (0.25 * l0.item<double>() + 2.0 * l1.item<double>()) / 2, 1e-5);
  // With per-position weights the sample weights stay out of the normalizer.
  const auto w = torch::ones({2, 1, 8, 8});
  EXPECT_NEAR(
      DenoisingLoss(unet, *s, lat, noise, t, ctx, w, torch::tensor({0.25, 2.0})).item<double>(),
      both.item<double>(), 1e-5);
}

TEST(SampleTimestepTest, GridDrawsOnlyItsTimestepsAndEachOfThem) {
  TimestepSampling grid;
  grid.grid = {999, 832, 666, 499, 332, 166};
  TimestepSampling from_one{.min_timestep = 1};
  std::set<int64_t> seen;
  for (int64_t i = 0; i < 400; ++i) {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(i);
    seen.insert(SampleTimestep(grid, 1000, g));
    at::Generator h = at::make_generator<at::CPUGeneratorImpl>(i);
    const int64_t t = SampleTimestep(from_one, 1000, h);
    EXPECT_GE(t, 1);
    EXPECT_LT(t, 1000);
  }
  EXPECT_EQ(seen, std::set<int64_t>(grid.grid.begin(), grid.grid.end()));
}

}  // namespace
}  // namespace sd
