#include "sd/schedulers/scheduler.h"

#include <gtest/gtest.h>

#include "tests/cpp/test_configs.h"

namespace sd {
namespace {

JsonConfig Sd15(const nlohmann::json& extra = nlohmann::json::object()) {
  return testdata::Sd15Scheduler(extra);
}

TEST(SchedulerTest, DdimLeadingSpacingAsDiffusers) {
  auto s = MakeScheduler("ddim", Sd15());
  ASSERT_TRUE(s.ok());
  (*s)->SetTimesteps(50);
  const auto& t = (*s)->timesteps();
  ASSERT_EQ(t.size(), 50u);
  EXPECT_EQ(t.front(), 981);  // 49 * 20 + steps_offset
  EXPECT_EQ(t.back(), 1);
}

TEST(SchedulerTest, PndmRepeatsSecondToLastTimestep) {
  auto s = MakeScheduler("default", Sd15());
  ASSERT_TRUE(s.ok());
  (*s)->SetTimesteps(4);
  EXPECT_EQ((*s)->timesteps(), (std::vector<double>{751, 501, 501, 251, 1}));
}

TEST(SchedulerTest, TrailingAndLinspace) {
  auto d = MakeScheduler("ddim", Sd15({{"timestep_spacing", "trailing"}}));
  ASSERT_TRUE(d.ok());
  (*d)->SetTimesteps(4);
  EXPECT_EQ((*d)->timesteps(), (std::vector<double>{999, 749, 499, 249}));
  auto e = MakeScheduler("dpm++2m", Sd15({{"timestep_spacing", "linspace"}}));
  ASSERT_TRUE(e.ok());
  (*e)->SetTimesteps(4);
  // np.linspace(0, 999, 5).round()[::-1][:-1] with round-half-to-even: 749.25 -> 749, 249.75 -> 250
  EXPECT_EQ((*e)->timesteps(), (std::vector<double>{999, 749, 500, 250}));
}

TEST(SchedulerTest, EulerInitNoiseSigmaDependsOnSpacing) {
  auto lin = MakeScheduler("euler", Sd15({{"timestep_spacing", "linspace"}}));
  auto lead = MakeScheduler("euler", Sd15());
  ASSERT_TRUE(lin.ok() && lead.ok());
  (*lin)->SetTimesteps(10);
  (*lead)->SetTimesteps(10);
  EXPECT_NEAR((*lin)->init_noise_sigma(), 14.6146, 1e-3);  // SD1.5's sigma_max
  EXPECT_GT((*lead)->init_noise_sigma(), 1.0);
}

TEST(SchedulerTest, AddNoiseMatchesClosedForm) {
  auto s = MakeScheduler("ddim", Sd15());
  ASSERT_TRUE(s.ok());
  auto x0 = torch::ones({1, 1, 1, 1});
  auto eps = torch::zeros({1, 1, 1, 1});
  auto t = torch::tensor({999}, torch::kLong);
  float a = (*s)->alphas_cumprod()[999].item<float>();
  EXPECT_NEAR((*s)->AddNoise(x0, eps, t).item<float>(), std::sqrt(a), 1e-7);
  EXPECT_NEAR(a, 0.0047, 1e-4);
}

TEST(SchedulerTest, BadConfigsNameTheKey) {
  auto bad = MakeScheduler("ddim", Sd15({{"beta_schedule", "cosine"}}));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("\"beta_schedule\""), std::string::npos) << bad.status();
  auto karras = MakeScheduler("euler", Sd15({{"use_karras_sigmas", true}}));
  ASSERT_FALSE(karras.ok());
  EXPECT_NE(karras.status().message().find("use_karras_sigmas"), std::string::npos);
  auto unknown = MakeScheduler("lms", Sd15());
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("ddim, euler, dpm++2m, pndm"), std::string::npos);
  auto prk = MakeScheduler("pndm", Sd15({{"skip_prk_steps", false}}));
  ASSERT_FALSE(prk.ok());
}

}  // namespace
}  // namespace sd
