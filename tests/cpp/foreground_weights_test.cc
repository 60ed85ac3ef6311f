#include "sd/train/foreground_weights.h"

#include <gtest/gtest.h>

namespace sd {
namespace {

TEST(ForegroundWeightsTest, ObjectCountsUpToOnePlusWBackgroundOne) {
  // Two images: a bright 2x2 object on a flat background, and a faint one.
  auto x = torch::full({2, 3, 8, 8}, -0.5);
  x.index_put_(
      {0, torch::indexing::Slice(), torch::indexing::Slice(2, 4), torch::indexing::Slice(5, 7)},
      0.9);
  x.index_put_({1, 0, 6, 1}, -0.4);
  const auto w = ForegroundWeights(x, 10);
  ASSERT_EQ(w.sizes(), (std::vector<int64_t>{2, 1, 8, 8}));
  EXPECT_FLOAT_EQ(w[0][0][0][0].item<float>(), 1.0f);   // background
  EXPECT_FLOAT_EQ(w[0][0][2][5].item<float>(), 11.0f);  // object
  EXPECT_FLOAT_EQ(w.sum().item<float>(), 2 * 64 + 10 * (4 + 1));
  // Per image: a faint object gets the same emphasis as a bright one.
  EXPECT_FLOAT_EQ(w[1][0][6][1].item<float>(), 11.0f);
  // A flat image is all background.
  EXPECT_TRUE(torch::allclose(ForegroundWeights(torch::zeros({1, 4, 4, 4}), 10),
                              torch::ones({1, 1, 4, 4})));
}

}  // namespace
}  // namespace sd
