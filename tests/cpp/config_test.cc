#include <gtest/gtest.h>

#include "sd/io/json_config.h"
#include "sd/models/autoencoder_kl.h"
#include "sd/models/state_dict.h"
#include "sd/models/unet_2d_condition.h"
#include "tests/cpp/test_configs.h"

namespace sd {
namespace {

using testdata::TinyUNet;

TEST(ConfigTest, UNetWidthsComeFromConfig) {
  auto cfg = UNetConfig::FromJson(JsonConfig::FromJson(TinyUNet(), "unet/config.json"));
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  UNet2DConditionModel unet(*cfg);
  auto sd = StateDict(*unet);
  EXPECT_EQ(sd.at("conv_in.weight").sizes(), (std::vector<int64_t>{32, 4, 3, 3}));
  EXPECT_EQ(sd.at("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight").sizes(),
            (std::vector<int64_t>{32, 32}));
  EXPECT_EQ(sd.at("up_blocks.1.resnets.0.conv1.weight").sizes(),
            (std::vector<int64_t>{32, 64 + 32, 3, 3}));
  auto out = unet->forward(torch::randn({1, 4, 8, 8}), torch::tensor(10), torch::randn({1, 7, 32}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 4, 8, 8}));
}

TEST(ConfigTest, WrongTypeNamesFileAndKey) {
  auto j = TinyUNet();
  j["block_out_channels"] = "wide";
  auto cfg = UNetConfig::FromJson(JsonConfig::FromJson(j, "unet/config.json"));
  ASSERT_FALSE(cfg.ok());
  EXPECT_EQ(
      cfg.status().message(),
      "unet/config.json: key \"block_out_channels\" must be a list of integers, got \"wide\"");
}

TEST(ConfigTest, UnsupportedFeatureIsRefused) {
  auto j = TinyUNet();
  j["class_embed_type"] = "timestep";
  auto cfg = UNetConfig::FromJson(JsonConfig::FromJson(j, "unet/config.json"));
  ASSERT_FALSE(cfg.ok());
  EXPECT_NE(cfg.status().message().find("class_embed_type"), std::string::npos);
}

TEST(ConfigTest, CheckpointThatDoesNotFitNamesTensorAndBothShapes) {
  auto cfg = UNetConfig::FromJson(JsonConfig::FromJson(TinyUNet(), "unet/config.json"));
  ASSERT_TRUE(cfg.ok());
  UNet2DConditionModel unet(*cfg);
  auto tensors = StateDict(*unet);
  tensors["conv_in.weight"] = torch::zeros({48, 4, 3, 3});
  tensors.erase("conv_out.bias");
  tensors["extra.weight"] = torch::zeros({1});
  auto s =
      LoadStateDict(*unet, tensors, "unet/diffusion_pytorch_model.safetensors", "unet/config.json");
  ASSERT_FALSE(s.ok());
  const std::string m(s.message());
  EXPECT_NE(m.find("tensor \"conv_in.weight\" has shape [48, 4, 3, 3] in "
                   "unet/diffusion_pytorch_model.safetensors "
                   "but unet/config.json implies [32, 4, 3, 3]"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("missing tensor \"conv_out.bias\""), std::string::npos) << m;
  EXPECT_NE(m.find("unexpected tensor \"extra.weight\""), std::string::npos) << m;
}

TEST(ConfigTest, VAEPrunedWidthsLoad) {
  nlohmann::json j = {{"block_out_channels", {24, 48, 48}},
                      {"norm_num_groups", 8},
                      {"latent_channels", 4},
                      {"layers_per_block", 1}};
  auto cfg = VAEConfig::FromJson(JsonConfig::FromJson(j, "vae/config.json"));
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  AutoencoderKL vae(*cfg);
  torch::NoGradGuard g;
  auto post = vae->encode(torch::randn({1, 3, 16, 16}));
  EXPECT_EQ(post.mean.sizes(), (std::vector<int64_t>{1, 4, 4, 4}));
  EXPECT_EQ(vae->decode(post.mean).sizes(), (std::vector<int64_t>{1, 3, 16, 16}));
}

}  // namespace
}  // namespace sd
