// The pieces every training stage shares: the learning-rate schedule and the
// trainer's checkpoints across several trained components; and the stages'
// own pure parts (clip_distillation's layer mapping).
#include "stages/training.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "stages/clip_distillation/clip_distillation_stage.h"

namespace sd::stages {
namespace {

TEST(LearningRateTest, WarmUpThenScheduleEndsAtZero) {
  LoopOptions o;
  o.lr = 1e-3;
  o.total_steps = 110;
  o.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(LearningRate(o, 0), 1e-4);  // (step + 1) / warmup
  EXPECT_DOUBLE_EQ(LearningRate(o, 9), 1e-3);
  EXPECT_DOUBLE_EQ(LearningRate(o, 50), 1e-3);  // constant
  o.schedule = "cosine";
  EXPECT_DOUBLE_EQ(LearningRate(o, 10), 1e-3);
  EXPECT_NEAR(LearningRate(o, 60), 0.5e-3, 1e-12);  // half-way: half the rate
  EXPECT_NEAR(LearningRate(o, 110), 0.0, 1e-12);
  EXPECT_GT(LearningRate(o, 30), LearningRate(o, 31));
  o.schedule = "linear";
  EXPECT_NEAR(LearningRate(o, 35), 0.75e-3, 1e-12);
  EXPECT_NEAR(LearningRate(o, 110), 0.0, 1e-12);
}

struct Two {
  torch::nn::Linear a{3, 2}, b{2, 4};
};

void TrainSteps(ParamTrainer& t, Two& m, int n) {
  for (int i = 0; i < n; ++i) {
    auto x = torch::ones({5, 3}) * (i + 1);
    m.b(m.a(x)).pow(2).mean().backward();
    Collectives alone;
    t.Step(1e-2, 1.0, alone);
  }
}

TEST(ParamTrainerTest, SeveralPartsCheckpointAndResumeExactly) {
  const auto dir = std::filesystem::temp_directory_path() / "sd_training_test_ckpt";
  std::filesystem::remove_all(dir);
  torch::manual_seed(0);
  Two full, resumed;
  ParamTrainer t({{"unet", full.a.get()}, {"text_encoder", full.b.get()}}, 1e-2, 1e-2, 0.9);
  TrainSteps(t, full, 3);
  ASSERT_TRUE(t.Save(dir.string(), 3, {}).ok());
  TrainSteps(t, full, 2);

  ParamTrainer r({{"unet", resumed.a.get()}, {"text_encoder", resumed.b.get()}}, 1e-2, 1e-2, 0.9);
  auto step = r.Resume(dir.string());
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 3);
  TrainSteps(r, resumed, 2);
  for (const std::string stem : {"unet", "text_encoder"}) {
    const auto a = t.Weights(stem), b = r.Weights(stem);
    ASSERT_EQ(a.size(), 2u) << stem;  // weight and bias of that part only
    for (const auto& [name, w] : a) EXPECT_TRUE(torch::equal(w, b.at(name))) << stem << " " << name;
  }

  // A checkpoint without one of the parts (written before train_text_encoder was
  // turned on) is refused by name, not half-restored.
  std::filesystem::remove_all(dir);
  Two other;
  ParamTrainer only_unet("unet", *other.a, 1e-2, 1e-2, 0.9);
  ASSERT_TRUE(only_unet.Save(dir.string(), 1, {}).ok());
  ParamTrainer both({{"unet", other.a.get()}, {"text_encoder", other.b.get()}}, 1e-2, 1e-2, 0.9);
  auto bad = both.Resume(dir.string());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("no text_encoder tensors"), std::string::npos)
      << bad.status();
  std::filesystem::remove_all(dir);
}

TEST(ParamTrainerTest, FrozenParametersAreWrittenUnchanged) {
  torch::manual_seed(0);
  Two m;
  m.b->bias.requires_grad_(false);
  const torch::Tensor bias = m.b->bias.detach().clone(), weight = m.b->weight.detach().clone();
  ParamTrainer t({{"unet", m.a.get()}, {"text_encoder", m.b.get()}}, 1e-2, 1e-2, 0.9);
  TrainSteps(t, m, 3);
  const auto w = t.Weights("text_encoder");
  ASSERT_EQ(w.size(), 2u);  // the frozen bias too, so the written component is whole
  EXPECT_TRUE(torch::equal(w.at("bias"), bias));
  EXPECT_FALSE(torch::equal(w.at("weight"), weight));
  EXPECT_TRUE(t.Weights("vae").empty());
}

}  // namespace
}  // namespace sd::stages

namespace sd::stages {
namespace {

std::vector<int64_t> Map(int64_t teacher, int64_t layers = 0, std::vector<int64_t> given = {}) {
  ClipDistillationOptions o;
  o.layers = layers;
  o.teacher_layers = std::move(given);
  auto m = StudentLayerMap(o, teacher, "/m/text_encoder");
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *m : std::vector<int64_t>{};
}

TEST(ClipDistillationTest, StudentLayersSpreadEvenlyEndingOnTheTeachersLast) {
  EXPECT_EQ(Map(12), (std::vector<int64_t>{1, 3, 5, 7, 9, 11}));  // SD1.5: half
  EXPECT_EQ(Map(2), (std::vector<int64_t>{1}));                   // the toy teacher
  EXPECT_EQ(Map(3), (std::vector<int64_t>{0, 2}));                // half, rounded up
  EXPECT_EQ(Map(12, 4), (std::vector<int64_t>{2, 5, 8, 11}));
  EXPECT_EQ(Map(12, 0, {0, 4, 11}), (std::vector<int64_t>{0, 4, 11}));
}

TEST(ClipDistillationTest, AStudentTheTeacherCannotGiveIsNamed) {
  ClipDistillationOptions o;
  o.layers = 12;
  EXPECT_EQ(StudentLayerMap(o, 12, "/m/text_encoder").status().message(),
            "clip_distillation.layers: 12 student layers for a teacher of 12 (/m/text_encoder); "
            "the student must have fewer");
  o.layers = 0;
  o.teacher_layers = {3, 12};
  EXPECT_EQ(StudentLayerMap(o, 12, "/m/text_encoder").status().message(),
            "clip_distillation.teacher_layers: names teacher layer 12, but the text encoder of "
            "/m/text_encoder has layers 0..11");
}

}  // namespace
}  // namespace sd::stages
