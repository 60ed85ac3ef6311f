#include "stages/catalog.h"

#include "stages/finetune/finetune_options.h"
#include "stages/train_vae/train_vae_options.h"

#include <gtest/gtest.h>

namespace sd {
namespace {

const stages::FinetuneOptions& FT(const JobSpec& s) {
  return s.Options<stages::FinetuneOptions>("finetune");
}
const stages::TrainVaeOptions& VAE(const JobSpec& s) {
  return s.Options<stages::TrainVaeOptions>("train_vae");
}

// Training stages need a dataset; it goes last so the tests' line numbers stay put.
absl::StatusOr<JobSpec> Parse(const std::string& yaml) {
  return ParseJobSpec(yaml + "dataset: /d\n", "job.yaml");
}

std::string Err(const std::string& yaml) {
  auto s = Parse(yaml);
  EXPECT_FALSE(s.ok()) << yaml;
  return s.ok() ? "" : std::string(s.status().message());
}

TEST(JobSpecTest, DefaultsAreThoseOfTheSeedPipeline) {
  auto s = Parse("model: /m\nstages: [finetune]\n");
  ASSERT_TRUE(s.ok()) << s.status();
  const auto& f = s->Options<stages::FinetuneOptions>("finetune");
  EXPECT_EQ(f.steps, 200);                // FINETUNE_STEPS
  EXPECT_DOUBLE_EQ(f.lr, 5e-6);           // FINETUNE_LR
  EXPECT_DOUBLE_EQ(f.ema_decay, 0.9999);  // EMA_DECAY
  EXPECT_EQ(s->checkpoint_interval, 100);
  ASSERT_EQ(s->stages.size(), 1u);
  EXPECT_EQ(s->stages[0].workers, 1);
  // Every catalog stage has its options, listed or not.
  EXPECT_EQ(s->Options<stages::TrainVaeOptions>("train_vae").steps, 2000);
}

TEST(JobSpecTest, PerStageWorkers) {
  auto s = Parse("model: /m\nworkers: 3\nstages:\n  - finetune: {workers: 2, max_restarts: 5}\n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->stages[0].workers, 2);
  EXPECT_EQ(s->stages[0].max_restarts, 5);
}

TEST(JobSpecTest, UnknownKeySuggestsTheNearest) {
  EXPECT_EQ(Err("model: /m\nstages: [finetune]\nfinetune:\n  stpes: 10\n"),
            "job.yaml:4: unknown key \"finetune.stpes\" (did you mean \"steps\"?)");
}

TEST(JobSpecTest, WrongTypeNamesLineAndKey) {
  EXPECT_EQ(Err("model: /m\nstages: [finetune]\nfinetune:\n  lr: fast\n"),
            "job.yaml:4: key \"finetune.lr\" must be a number, got \"fast\"");
}

TEST(JobSpecTest, OutOfRange) {
  EXPECT_EQ(Err("model: /m\nstages: [finetune]\nfinetune:\n  ema_decay: 1.5\n"),
            "job.yaml:4: key \"finetune.ema_decay\" is 1.5, out of range [0, 1)");
  // A section of a stage this build does not have is an unknown key, not ignored.
  EXPECT_EQ(Err("model: /m\nstages: [finetune]\nquantization:\n  int8: true\n"),
            "job.yaml:3: unknown key \"quantization\"");
  EXPECT_EQ(Err("model: /m\nstages: [prune]\npruning:\n  unet_ratio: 0.3\n"),
            "job.yaml:3: unknown key \"pruning\" (did you mean \"prune\"?)");
}

TEST(JobSpecTest, UnimplementedStageIsRefusedNotSkipped) {
  EXPECT_EQ(Err("model: /m\nstages: [optimize]\n"),
            "job.yaml:2: stage \"optimize\" is not implemented in this build (implemented: init, "
            "train_vae, progressive_distillation, clip_distillation, cfg_distillation, prune, "
            "finetune, quantize, export); remove it from \"stages\"");
  EXPECT_NE(Err("model: /m\n").find("is not implemented"), std::string::npos);
  EXPECT_EQ(Err("model: /m\nstages: [finetuen]\n"),
            "job.yaml:2: unknown stage \"finetuen\" (did you mean \"finetune\"?)");
}

TEST(JobSpecTest, MixedPrecisionIsNoOrBf16) {
  auto s = Parse("model: /m\nstages: [finetune]\nfinetune:\n  mixed_precision: bf16\n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(FT(*s).mixed_precision, "bf16");
  EXPECT_NE(Err("model: /m\nstages: [finetune]\nfinetune:\n  mixed_precision: fp16\n")
                .find("job.yaml:4: key \"finetune.mixed_precision\" must be no or bf16"),
            std::string::npos);
}

TEST(JobSpecTest, MissingModelAndBadYaml) {
  EXPECT_NE(Err("stages: [finetune]\n").find("key \"model\" is required"), std::string::npos);
  EXPECT_NE(Err("model: [unclosed\n").find("invalid YAML"), std::string::npos);
}

TEST(JobSpecTest, TeacherStagesDataAndTheirKeys) {
  auto s = Parse(
      "model: /m\nstages: [finetune, train_vae, init]\ndata: {caption_dropout: 0.1, random_flip: "
      "true}\ntrain_vae: {steps: 30, foreground_weight: 10}\nfinetune: {ema: true, ema_decay: "
      "0.99}\n");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->stages.size(), 3u);  // pipeline order, whatever the file says
  EXPECT_EQ(s->stages[0].name, "init");
  EXPECT_EQ(s->stages[1].name, "train_vae");
  EXPECT_EQ(s->stages[2].name, "finetune");
  EXPECT_DOUBLE_EQ(s->caption_dropout, 0.1);
  EXPECT_TRUE(s->random_flip);
  EXPECT_TRUE(s->center_crop);
  EXPECT_EQ(VAE(*s).steps, 30);
  EXPECT_DOUBLE_EQ(VAE(*s).foreground_weight, 10);
  EXPECT_DOUBLE_EQ(FT(*s).ema_decay, 0.99);
  EXPECT_EQ(StageTotalSteps(*s, "train_vae"), 30);
  EXPECT_EQ(StageTotalSteps(*s, "finetune"), 200);
  EXPECT_NE(Err("model: /m\nstages: [finetune]\ndata:\n  caption_dropout: 1.5\n")
                .find("job.yaml:4: key \"data.caption_dropout\" is 1.5, out of range [0, 1)"),
            std::string::npos);
  EXPECT_NE(Err("model: /m\nstages: [finetune]\ntrain_vae:\n  stesp: 3\n")
                .find("unknown key \"train_vae.stesp\" (did you mean \"steps\"?)"),
            std::string::npos);
  // A job without a stage list runs the compression pipeline, not the teacher stages.
  EXPECT_NE(Err("model: /m\n").find("stage \"optimize\" is not implemented"), std::string::npos);
}

TEST(JobSpecTest, LrSchedulerTextEncoderAndLatentCache) {
  auto s = Parse(
      "model: /m\nstages: [finetune]\ntrain_vae: {lr_scheduler: linear}\nfinetune: "
      "{lr_scheduler: cosine, train_text_encoder: true, train_token_embedding: false, "
      "cache_latents: true, foreground_weight: 10, snr_gamma: 5}\n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(VAE(*s).lr_scheduler, "linear");
  EXPECT_EQ(FT(*s).lr_scheduler, "cosine");
  EXPECT_TRUE(FT(*s).train_text_encoder);
  EXPECT_FALSE(FT(*s).train_token_embedding);
  EXPECT_TRUE(FT(*s).cache_latents);
  EXPECT_DOUBLE_EQ(FT(*s).foreground_weight, 10);
  EXPECT_DOUBLE_EQ(FT(*s).snr_gamma, 5);
  EXPECT_EQ(FT(*s).timestep_sampling, "uniform");
  auto ln = Parse(
      "model: /m\nstages: [finetune]\nfinetune: {timestep_sampling: logit_normal, "
      "logit_mean: 1, logit_std: 0.5}\n");
  ASSERT_TRUE(ln.ok()) << ln.status();
  EXPECT_EQ(FT(*ln).timestep_sampling, "logit_normal");
  EXPECT_DOUBLE_EQ(FT(*ln).logit_mean, 1);
  EXPECT_DOUBLE_EQ(FT(*ln).logit_std, 0.5);
  EXPECT_NE(Err("model: /m\nstages: [finetune]\nfinetune:\n  timestep_sampling: logit\n")
                .find("job.yaml:4: key \"finetune.timestep_sampling\" must be one of uniform, "
                      "logit_normal, got \"logit\""),
            std::string::npos);
  EXPECT_NE(Err("model: /m\nstages: [finetune]\nfinetune:\n  logit_std: -1\n")
                .find("job.yaml:4: key \"finetune.logit_std\""),
            std::string::npos);
  EXPECT_NE(Err("model: /m\nstages: [finetune]\nfinetune:\n  snr_gamma: -1\n")
                .find("job.yaml:4: key \"finetune.snr_gamma\""),
            std::string::npos);
  EXPECT_EQ(FT(*Parse("model: /m\nstages: [finetune]\n")).lr_scheduler, "constant");
  EXPECT_NE(Err("model: /m\nstages: [finetune]\nfinetune:\n  lr_scheduler: cosin\n")
                .find("job.yaml:4: key \"finetune.lr_scheduler\" must be one of constant, cosine, "
                      "linear, got \"cosin\" (did you mean \"cosine\"?)"),
            std::string::npos);
  // One cached latent per image cannot stand for random crops or flips.
  EXPECT_NE(Err("model: /m\nstages: [finetune]\ndata: {random_flip: true}\nfinetune:\n  "
                "cache_latents: true\n")
                .find("job.yaml:5: key \"finetune.cache_latents\" needs a deterministic transform"),
            std::string::npos);
}

TEST(JobSpecTest, ARepeatedKeyIsAnErrorNotTheFirstValueSilently) {
  EXPECT_EQ(Err("model: /nonexistent\nstages: [finetune]\nmodel: /m\n"),
            "job.yaml:3: key \"model\" given twice (first on line 1)");
  EXPECT_EQ(Err("model: /m\nstages: [finetune]\nfinetune:\n  steps: 1\n  lr: 1e-4\n  steps: 2\n"),
            "job.yaml:6: key \"steps\" given twice (first on line 4)");
  EXPECT_EQ(Err("model: /m\nstages:\n  - finetune: {workers: 1, workers: 2}\n"),
            "job.yaml:3: key \"workers\" given twice (first on line 3)");
}

TEST(JobSpecTest, AComplexKeyIsAnErrorNotACrash) {
  EXPECT_EQ(Err("model: /m\n? [a, b]\n: 1\n"),
            "job.yaml:2: a key must be a plain name, not a list or mapping");
  EXPECT_EQ(Err("model: /m\nfinetune:\n  ? {x: 1}\n  : 2\n"),
            "job.yaml:3: a key must be a plain name, not a list or mapping");
}

TEST(JobSpecTest, ANulByteOrAHugeFileIsRefused) {
  const std::string nul("model: /m\nstages: [finetune]\n# a\0b\n", 33);
  EXPECT_EQ(Err(nul), "job.yaml:3: contains a NUL byte; a job file must be text");
  std::string big = "model: /m\nstages: [finetune]\n";
  big += "# " + std::string(10 << 20, 'x') + "\n";
  EXPECT_NE(Err(big).find("job.yaml: the file is 10.0 MiB; a job file may be at most 1024 KiB"),
            std::string::npos);
}

TEST(JobSpecTest, FaultToleranceKeys) {
  auto s = Parse("model: /m\nstages: [finetune]\n");
  ASSERT_TRUE(s.ok());
  EXPECT_DOUBLE_EQ(s->max_skipped_fraction, 0.01);
  EXPECT_FALSE(s->allow_restart_from_zero);
  s = Parse(
      "model: /m\nstages: [finetune]\nallow_restart_from_zero: true\ndata:\n  "
      "max_skipped_fraction: 0.5\n");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_DOUBLE_EQ(s->max_skipped_fraction, 0.5);
  EXPECT_TRUE(s->allow_restart_from_zero);
  EXPECT_EQ(Err("model: /m\nstages: [finetune]\ndata:\n  max_skipped_fraction: 2\n"),
            "job.yaml:4: key \"data.max_skipped_fraction\" is 2, out of range [0, 1]");
}

}  // namespace
}  // namespace sd
