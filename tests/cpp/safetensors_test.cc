#include "sd/io/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "sd/util/file.h"

namespace sd::safetensors {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("st_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes a raw file: 8-byte header length + header + data.
  std::string WriteRaw(const std::string& name, const std::string& header, const std::string& data,
                       std::optional<uint64_t> len = std::nullopt) {
    uint64_t n = len.value_or(header.size());
    std::string bytes(reinterpret_cast<const char*>(&n), 8);
    bytes += header + data;
    EXPECT_TRUE(WriteFileAtomic(Path(name), bytes).ok());
    return Path(name);
  }
  std::string ErrorOf(const std::string& path) {
    auto f = File::Open(path);
    EXPECT_FALSE(f.ok()) << path;
    return f.ok() ? "" : std::string(f.status().message());
  }
  fs::path dir_;
};

TEST_F(SafetensorsTest, RoundTripsEveryFloatDtype) {
  TensorMap m{{"f32", torch::randn({3, 4})},
              {"f16", torch::randn({5}).to(torch::kFloat16)},
              {"bf16", torch::randn({2, 2, 2}).to(torch::kBFloat16)},
              {"i64", torch::arange(7)},
              {"empty", torch::zeros({0, 3})}};
  ASSERT_TRUE(Save(Path("a.safetensors"), m, {{"format", "pt"}}).ok());
  auto f = File::Open(Path("a.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->metadata().at("format"), "pt");
  auto loaded = Load(Path("a.safetensors"));
  ASSERT_TRUE(loaded.ok());
  ASSERT_EQ(loaded->size(), m.size());
  for (const auto& [name, t] : m) {
    EXPECT_EQ(loaded->at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(loaded->at(name), t)) << name;
  }
}

TEST_F(SafetensorsTest, ZeroCopyWhenDtypeMatchesAndConvertsOtherwise) {
  ASSERT_TRUE(Save(Path("z.safetensors"), {{"w", torch::randn({64, 64})}}).ok());
  auto f = File::Open(Path("z.safetensors"));
  ASSERT_TRUE(f.ok());
  auto a = f->Get("w");
  auto b = f->Get("w");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->data_ptr(), b->data_ptr());  // both alias the mapping
  auto h = f->Get("w", torch::kFloat16);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->scalar_type(), torch::kFloat16);
  // A write goes to a private page, never into the file.
  a->fill_(3.0);
  auto again = Load(Path("z.safetensors"));
  ASSERT_TRUE(again.ok());
  EXPECT_NE(again->at("w")[0][0].item<float>(), 3.0f);
}

TEST_F(SafetensorsTest, ShardedRoundTripWithIndex) {
  TensorMap m;
  for (int i = 0; i < 10; ++i) m["layer." + std::to_string(i)] = torch::randn({100});
  auto index = SaveSharded(dir_.string(), "model", m, 1000);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_TRUE(fs::exists(Path("model-00001-of-00005.safetensors")));
  auto loaded = Load(*index);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  for (const auto& [name, t] : m) EXPECT_TRUE(torch::equal(loaded->at(name), t)) << name;
}

TEST_F(SafetensorsTest, IndexPointingAtWrongShardIsAnError) {
  ASSERT_TRUE(Save(Path("s1.safetensors"), {{"a", torch::ones({2})}}).ok());
  ASSERT_TRUE(
      WriteFileAtomic(Path("x.index.json"), R"({"weight_map": {"b": "s1.safetensors"}})").ok());
  auto r = Load(Path("x.index.json"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("\"b\""), std::string::npos) << r.status();
}

TEST_F(SafetensorsTest, ShortFile) {
  ASSERT_TRUE(WriteFileAtomic(Path("short"), "abc").ok());
  EXPECT_NE(ErrorOf(Path("short")).find("shorter than the 8-byte header length"),
            std::string::npos);
}

TEST_F(SafetensorsTest, HeaderLengthPastEnd) {
  auto p = WriteRaw("len", "{}", "", 4096);
  EXPECT_NE(ErrorOf(p).find("runs past the end"), std::string::npos) << ErrorOf(p);
}

TEST_F(SafetensorsTest, HeaderNotJson) {
  auto p = WriteRaw("json", "{not json", "");
  EXPECT_NE(ErrorOf(p).find("not valid JSON"), std::string::npos);
}

TEST_F(SafetensorsTest, UnknownDtype) {
  auto p = WriteRaw("dtype", R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}})",
                    std::string(4, '\0'));
  std::string e = ErrorOf(p);
  EXPECT_NE(e.find("tensor \"w\""), std::string::npos) << e;
  EXPECT_NE(e.find("unknown dtype \"F7\""), std::string::npos) << e;
}

TEST_F(SafetensorsTest, OffsetsOutOfRangeMeansTruncated) {
  auto p = WriteRaw("trunc", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                    std::string(8, '\0'));
  std::string e = ErrorOf(p);
  EXPECT_NE(e.find("run past the 8 bytes of data"), std::string::npos) << e;
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
  auto p = WriteRaw(
      "overlap",
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      std::string(12, '\0'));
  std::string e = ErrorOf(p);
  EXPECT_NE(e.find("overlapping"), std::string::npos) << e;
}

TEST_F(SafetensorsTest, ShapeDisagreesWithByteCount) {
  auto p = WriteRaw("size", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                    std::string(8, '\0'));
  std::string e = ErrorOf(p);
  EXPECT_NE(e.find("shape [3] of F32 needs 12 bytes but data_offsets span 8"), std::string::npos)
      << e;
}

TEST_F(SafetensorsTest, NegativeDimension) {
  auto p = WriteRaw("neg", R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", "");
  EXPECT_NE(ErrorOf(p).find("negative"), std::string::npos);
}

TEST_F(SafetensorsTest, TruncatedRealFileIsDetected) {
  ASSERT_TRUE(Save(Path("t.safetensors"), {{"w", torch::randn({256})}}).ok());
  fs::resize_file(Path("t.safetensors"), fs::file_size(Path("t.safetensors")) - 100);
  std::string e = ErrorOf(Path("t.safetensors"));
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
}

TEST_F(SafetensorsTest, FailedSaveKeepsTheOldFile) {
  ASSERT_TRUE(Save(Path("keep.safetensors"), {{"w", torch::ones({4})}}).ok());
  // complex128 cannot be stored: the save fails and must leave the old file intact, with no temp
  // left over.
  auto s = Save(Path("keep.safetensors"), {{"w", torch::ones({4}, torch::kComplexDouble)}});
  EXPECT_FALSE(s.ok());
  auto loaded = Load(Path("keep.safetensors"));
  ASSERT_TRUE(loaded.ok());
  EXPECT_TRUE(torch::equal(loaded->at("w"), torch::ones({4})));
  int files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 1);
}

}  // namespace
}  // namespace sd::safetensors
