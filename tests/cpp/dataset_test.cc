#include "sd/data/dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "sd/data/synth_shapes.h"
#include "sd/data/tar.h"
#include "sd/image/png_image.h"
#include "sd/util/file.h"

namespace sd {
namespace {
namespace fs = std::filesystem;

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ds_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Write(const std::string& format, int64_t count, int64_t shard_size,
                    const std::string& sub = "data") {
    synth::SynthOptions o;
    o.count = count;
    o.seed = 3;
    const std::string out = (dir_ / sub).string();
    EXPECT_TRUE(synth::WriteDataset(o, out, format, shard_size).ok());
    return out;
  }
  fs::path dir_;
};

TEST_F(DatasetTest, TarRoundTripsMembersAndRejectsBadChecksums) {
  std::string archive;
  ASSERT_TRUE(tar::AppendMember(archive, "a/000.txt", "hello").ok());
  ASSERT_TRUE(tar::AppendMember(archive, "a/000.png", std::string(600, 'x')).ok());
  tar::Finish(archive);
  EXPECT_EQ(archive.size() % 512, 0u);
  auto members = tar::Index(archive, "t.tar");
  ASSERT_TRUE(members.ok()) << members.status();
  ASSERT_EQ(members->size(), 2u);
  EXPECT_EQ((*members)[0].name, "a/000.txt");
  EXPECT_EQ(archive.substr((*members)[0].offset, (*members)[0].size), "hello");
  EXPECT_EQ((*members)[1].size, 600u);
  archive[3] ^= 1;  // damage the first header
  auto bad = tar::Index(archive, "t.tar");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("t.tar: bad tar header checksum at byte 0"),
            std::string::npos)
      << bad.status();
  EXPECT_FALSE(tar::AppendMember(archive, std::string(120, 'n'), "x").ok());
}

TEST_F(DatasetTest, SynthScenesAreDeterministicAndHeldOutCombinationsNeverTrain) {
  synth::SynthOptions train, held;
  // Radii small enough that every pair of cells fits two objects, so the
  // two-object fraction is the one asked for.
  train.radii = {0.075, 0.11, 0.15};
  held.split = "heldout";
  std::set<std::string> held_keys;
  for (int i = 0; i < 300; ++i) {
    const auto s = synth::MakeScene(held, i);
    ASSERT_EQ(s.objects.size(), 1u);
    EXPECT_TRUE(synth::IsHeldOut(s.objects[0], s.background));
    held_keys.insert(s.ToJson().dump());
  }
  int two = 0;
  for (int i = 0; i < 2000; ++i) {
    const auto s = synth::MakeScene(train, i);
    for (const auto& o : s.objects) EXPECT_FALSE(synth::IsHeldOut(o, s.background));
    two += s.objects.size() == 2;
    EXPECT_EQ(s.caption, synth::MakeScene(train, i).caption);
    // Every attribute a caption names is in it.
    for (const auto& o : s.objects) {
      EXPECT_NE(s.caption.find(synth::ShapeNames()[o.shape]), std::string::npos) << s.caption;
      EXPECT_NE(s.caption.find(synth::ColorNames()[o.color]), std::string::npos) << s.caption;
      EXPECT_NE(s.caption.find(synth::SizeNames()[o.size]), std::string::npos) << s.caption;
    }
    EXPECT_NE(s.caption.find(synth::BackgroundNames()[s.background]), std::string::npos);
  }
  EXPECT_GT(two, 300);
  EXPECT_LT(two, 700);
}

TEST_F(DatasetTest, RenderPutsTheShapeColorAtItsPosition) {
  synth::Scene s;
  s.objects = {
      {/*shape=*/0, /*color=*/2, /*size=*/2, /*position=*/8}};  // large blue circle, bottom right
  s.background = 0;                                             // white
  const auto img = synth::Render(s, 64, 0, 0).to(torch::kInt);
  const auto center = img[53][53];
  EXPECT_LT(center[0].item<int>(), 80);   // blue: little red
  EXPECT_GT(center[2].item<int>(), 180);  // much blue
  const auto corner = img[5][5];
  EXPECT_GT(corner.min().item<int>(), 220);  // white background elsewhere
}

TEST_F(DatasetTest, LargerRadiiDrawLargerObjectsAndPullTheGridIn) {
  synth::Scene s;
  s.objects = {
      {/*shape=*/1, /*color=*/0, /*size=*/2, /*position=*/0}};  // large red square, top left
  s.background = 0;
  auto covered = [](const torch::Tensor& img) {
    return (img.to(torch::kInt).select(2, 1) < 128).sum().item<int64_t>();  // red: little green
  };
  const auto base = synth::Render(s, 64, 0, 0, {0.075, 0.11, 0.15});
  const auto big = synth::Render(s, 64, 0, 0, {0.12, 0.155, 0.19});
  // Area grows with the radius squared: (0.19 / 0.15)^2 = 1.6.
  EXPECT_NEAR(static_cast<double>(covered(big)) / covered(base), 1.6, 0.25);
  // The whole square stays inside: the outer center moved in from 1/6 to 0.2 of the side.
  EXPECT_GT(big[1][1].to(torch::kInt).min().item<int>(), 220);
  EXPECT_LT(big[13][13][1].item<int>(), 128);

  // Two-object scenes keep their objects apart: cells closer than the radii
  // together are not paired (with these radii two large objects need a cell between them).
  synth::SynthOptions big_opts;
  big_opts.radii = {0.14, 0.19, 0.24};
  int two = 0;
  for (int64_t i = 0; i < 2000; ++i) {
    const auto scene = synth::MakeScene(big_opts, i);
    if (scene.objects.size() < 2) continue;
    ++two;
    const auto& a = scene.objects[0];
    const auto& b = scene.objects[1];
    const double spacing = (1 - 2 * 1.05 * 0.24) / 2;
    const double d = std::hypot(a.position % 3 - b.position % 3, a.position / 3 - b.position / 3);
    EXPECT_GE(d * spacing, big_opts.radii[a.size] + big_opts.radii[b.size]) << scene.caption;
  }
  EXPECT_GT(two, 200);

  synth::SynthOptions bad;
  bad.radii = {0.1, 0.2, 0.35};
  const auto st = synth::WriteDataset(bad, (fs::path(dir_) / "bad").string(), "png", 0);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("--radii"), std::string::npos) << st;
}

TEST_F(DatasetTest, ImageFolderSkipsMalformedLinesAndCorruptImages) {
  const std::string dir = Write("png", 12, 0);
  // A malformed line and a line without a caption.
  {
    std::ofstream meta(fs::path(dir) / "metadata.jsonl", std::ios::app);
    meta << "{not json\n{\"file_name\": \"000001.png\"}\n";
  }
  // A corrupt image: the first 40 bytes of a real PNG.
  auto bytes = ReadFile((fs::path(dir) / "000004.png").string());
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE(WriteFileAtomic((fs::path(dir) / "000004.png").string(), bytes->substr(0, 40)).ok());

  auto source = OpenDataset(dir);
  ASSERT_TRUE(source.ok()) << source.status();
  EXPECT_EQ((*source)->size(), 12u);
  ASSERT_EQ((*source)->problems().size(), 2u);
  EXPECT_NE((*source)->problems()[0].find("metadata.jsonl:13:"), std::string::npos)
      << (*source)->problems()[0];
  EXPECT_NE((*source)->problems()[1].find("metadata.jsonl:14:"), std::string::npos);

  // Reading the corrupt image names it.
  auto raw = (*source)->Read(4);
  ASSERT_TRUE(raw.ok());
  auto gen = SampleGenerator(0, 0, 0);
  auto item = Transform(*raw, TransformOptions{}, gen);
  ASSERT_FALSE(item.ok());
  EXPECT_NE(item.status().message().find("000004.png"), std::string::npos) << item.status();

  // The loader skips it, reports it once, and every batch is still full.
  std::shared_ptr<const CaptionedSource> shared = std::move(*source);
  LoaderOptions lo;
  lo.local_batch = 4;
  DataLoader loader(shared, lo, 0);
  std::set<int64_t> seen;
  for (int s = 0; s < 6; ++s) {
    auto b = loader.Next();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->pixels.sizes(), (std::vector<int64_t>{4, 3, 64, 64}));
    for (auto i : b->indices) seen.insert(i);
  }
  EXPECT_EQ(seen.count(4), 0u);
  EXPECT_EQ(seen.size(), 11u);
  ASSERT_EQ(loader.problems().size(), 1u);
  EXPECT_NE(loader.problems()[0].find("000004.png"), std::string::npos);
}

TEST_F(DatasetTest, WebDatasetShardsReadLikeTheImageFolder) {
  const std::string folder = Write("png", 10, 0, "folder");
  const std::string shards = Write("jpg", 10, 4, "shards");
  EXPECT_TRUE(fs::exists(fs::path(shards) / "shard-000002.tar"));
  auto a = OpenDataset(folder);
  auto b = OpenDataset(shards + "/shard-{000000..000002}.tar");
  ASSERT_TRUE(a.ok() && b.ok()) << b.status();
  ASSERT_EQ((*b)->size(), 10u);
  for (size_t i = 0; i < 10; ++i) {
    auto ra = (*a)->Read(i);
    auto rb = (*b)->Read(i);
    ASSERT_TRUE(ra.ok() && rb.ok());
    EXPECT_EQ(ra->caption, rb->caption);
    EXPECT_EQ(ra->meta["objects"], rb->meta["objects"]);
    auto g = SampleGenerator(0, 0, 0);
    auto ia = Transform(*ra, TransformOptions{}, g);
    auto ib = Transform(*rb, TransformOptions{}, g);
    ASSERT_TRUE(ia.ok() && ib.ok()) << ib.status();
    // JPEG quality 95 of flat shapes: close to the PNG.
    EXPECT_LT((ia->pixels - ib->pixels).abs().mean().item<double>(), 0.03);
  }
  // A truncated shard loses its own samples only.
  auto bytes = ReadFile((fs::path(shards) / "shard-000001.tar").string());
  ASSERT_TRUE(
      WriteFileAtomic((fs::path(shards) / "shard-000001.tar").string(), bytes->substr(0, 700))
          .ok());
  auto c = OpenDataset(shards);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->size(), 6u);
  ASSERT_EQ((*c)->problems().size(), 1u);
  EXPECT_NE((*c)->problems()[0].find("shard-000001.tar"), std::string::npos) << (*c)->problems()[0];
}

TEST_F(DatasetTest, RanksShardTheGlobalBatchAndResumeIsExact) {
  const std::string dir = Write("png", 20, 0);
  std::shared_ptr<const CaptionedSource> src = *OpenDataset(dir);
  LoaderOptions one;
  one.local_batch = 4;
  one.seed = 7;
  one.transform.center_crop = true;
  one.transform.random_flip = true;
  one.transform.caption_dropout = 0.3;
  LoaderOptions r0 = one, r1 = one;
  r0.local_batch = r1.local_batch = 2;
  r0.world_size = r1.world_size = 2;
  r1.rank = 1;
  DataLoader l1(src, one, 0), l0a(src, r0, 0), l0b(src, r1, 0);
  int dropped = 0;
  for (int s = 0; s < 10; ++s) {
    auto full = *l1.Next();
    auto a = *l0a.Next();
    auto b = *l0b.Next();
    EXPECT_TRUE(torch::equal(full.pixels, torch::cat({a.pixels, b.pixels})));
    for (int j = 0; j < 4; ++j) {
      EXPECT_EQ(full.captions[j], j < 2 ? a.captions[j] : b.captions[j - 2]);
      dropped += full.captions[j].empty();
    }
  }
  EXPECT_GT(dropped, 3);  // 30% of 40
  EXPECT_LT(dropped, 22);
  // Starting at step 6 gives what steps 6.. gave, prefetching or not.
  LoaderOptions inline_opts = one;
  inline_opts.prefetch = 0;
  DataLoader fresh(src, one, 0), resumed(src, inline_opts, 6);
  for (int s = 0; s < 6; ++s) ASSERT_TRUE(fresh.Next().ok());
  for (int s = 6; s < 12; ++s) {
    auto x = *fresh.Next();
    auto y = *resumed.Next();
    EXPECT_EQ(x.indices, y.indices);
    EXPECT_TRUE(torch::equal(x.pixels, y.pixels));
  }
  // An epoch visits every sample once.
  DataLoader epoch(src, one, 0);
  std::multiset<int64_t> seen;
  for (int s = 0; s < 5; ++s) {
    auto b = epoch.Next();
    ASSERT_TRUE(b.ok());
    for (auto i : b->indices) seen.insert(i);
  }
  EXPECT_EQ(seen.size(), 20u);
  EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 20u);
}

TEST_F(DatasetTest, CaptionsOnlyLoaderDecodesNothingAndDropsLikeTheImageLoader) {
  const std::string dir = Write("png", 10, 0);
  // An image that cannot be decoded does not matter to a captions-only loader.
  ASSERT_TRUE(WriteFileAtomic((fs::path(dir) / "000003.png").string(), "not a png").ok());
  std::shared_ptr<const CaptionedSource> src = *OpenDataset(dir);
  LoaderOptions text;
  text.local_batch = 5;
  text.seed = 3;
  text.transform.resolution = 0;
  text.transform.caption_dropout = 0.4;
  LoaderOptions images = text;
  images.transform.resolution = 32;
  DataLoader a(src, text, 0), b(src, images, 0);
  int dropped = 0;
  bool saw_undecodable = false;
  for (int s = 0; s < 6; ++s) {
    auto x = a.Next();
    ASSERT_TRUE(x.ok()) << x.status();
    EXPECT_FALSE(x->pixels.defined());
    ASSERT_EQ(x->captions.size(), 5u);
    for (int64_t i : x->indices) saw_undecodable |= i == 3;
    for (const auto& c : x->captions) dropped += c.empty();
    // The same draws as with images (center crop, no flip): the same captions dropped.
    auto y = *b.Next();
    for (size_t j = 0; j < y.indices.size(); ++j) {
      if (y.indices[j] == x->indices[j]) EXPECT_EQ(y.captions[j], x->captions[j]);
    }
  }
  EXPECT_TRUE(saw_undecodable);
  EXPECT_TRUE(a.problems().empty());
  EXPECT_GT(dropped, 3);  // 40% of 30
  EXPECT_LT(dropped, 22);
}

TEST_F(DatasetTest, RandomCropAndFlipFollowTheirOptions) {
  const std::string dir = Write("png", 4, 0);
  auto src = *OpenDataset(dir);
  auto raw = *src->Read(0);
  TransformOptions plain{32, true, false, 0.0};
  TransformOptions flip{32, true, true, 0.0};
  int flips = 0;
  for (int i = 0; i < 40; ++i) {
    auto g1 = SampleGenerator(1, i, 0), g2 = SampleGenerator(1, i, 0);
    auto a = *Transform(raw, plain, g1);
    auto b = *Transform(raw, flip, g2);
    EXPECT_EQ(a.pixels.sizes(), (std::vector<int64_t>{3, 32, 32}));
    if (!torch::equal(a.pixels, b.pixels)) {
      EXPECT_TRUE(torch::equal(a.pixels.flip({2}), b.pixels));
      ++flips;
    }
  }
  EXPECT_GT(flips, 8);
  EXPECT_LT(flips, 32);
  // A wide image is resized on its shorter side and cropped, at random when asked.
  auto wide = torch::arange(64 * 128 * 3).reshape({64, 128, 3}).remainder(251).to(torch::kUInt8);
  RawSample w{*EncodePng(wide), "wide.png", "c", {}};
  TransformOptions rc{64, false, false, 0.0};
  std::set<double> firsts;
  for (int i = 0; i < 10; ++i) {
    auto g = SampleGenerator(2, i, 0);
    auto t = *Transform(w, rc, g);
    EXPECT_EQ(t.pixels.sizes(), (std::vector<int64_t>{3, 64, 64}));
    firsts.insert(t.pixels[0][0][0].item<double>());
  }
  EXPECT_GT(firsts.size(), 3u);
}

}  // namespace
}  // namespace sd
