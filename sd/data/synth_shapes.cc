#include "sd/data/synth_shapes.h"

#include <array>
#include <cmath>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/data/tar.h"
#include "sd/image/jpeg_image.h"
#include "sd/image/png_image.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::synth {
namespace {

using RGB = std::array<int, 3>;
const std::vector<RGB>& ShapeRGB() {
  static const std::vector<RGB> k = {{220, 40, 40},  {40, 170, 60},  {40, 70, 220},
                                     {240, 220, 40}, {150, 60, 190}, {245, 140, 30}};
  return k;
}
const std::vector<RGB>& BackgroundRGB() {
  static const std::vector<RGB> k = {{245, 245, 245}, {128, 128, 128}, {20, 20, 20},
                                     {190, 60, 60},   {60, 140, 80},   {60, 90, 180}};
  return k;
}
// Background index -> shape color it must not be paired with (-1: none).
int ClashingColor(int background) {
  static const int k[] = {-1, -1, -1, 0, 1, 2};
  return k[background];
}
const char* const kPositionPhrase[] = {
    "at the top left",    "at the top",    "at the top right",
    "on the left",        "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right"};

uint64_t Mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::string ObjectPhrase(const Object& o) {
  return absl::StrCat(SizeNames()[o.size], " ", ColorNames()[o.color], " ", ShapeNames()[o.shape],
                      " ", kPositionPhrase[o.position]);
}

std::string Caption(const Scene& s, int variant) {
  const std::string& bg = BackgroundNames()[s.background];
  if (s.objects.size() == 1) {
    const Object& o = s.objects[0];
    const std::string size = SizeNames()[o.size], color = ColorNames()[o.color],
                      shape = ShapeNames()[o.shape], pos = kPositionPhrase[o.position];
    switch (variant % 4) {
      case 0:
        return absl::StrCat("a ", ObjectPhrase(o), " on a ", bg, " background");
      case 1:
        return absl::StrCat(bg, " background with a ", ObjectPhrase(o));
      case 2:
        return absl::StrCat(color == "orange" ? "an " : "a ", color, " ", shape, ", ", size, ", ",
                            pos, ", on ", bg);
      default:
        return absl::StrCat("an image of a ", ObjectPhrase(o), " against a ", bg, " background");
    }
  }
  const std::string a = ObjectPhrase(s.objects[0]), b = ObjectPhrase(s.objects[1]);
  if (variant % 2 == 0) return absl::StrCat("a ", a, " and a ", b, " on a ", bg, " background");
  return absl::StrCat(bg, " background with a ", a, " and a ", b);
}

// Polygon vertices (unit scale, centered) of each shape; circle is analytic.
std::vector<std::array<double, 2>> Polygon(int shape) {
  std::vector<std::array<double, 2>> v;
  const double pi = 3.14159265358979323846;
  if (shape == 1) {
    const double h = 0.85;  // about the circle's area
    v = {{-h, -h}, {h, -h}, {h, h}, {-h, h}};
  } else if (shape == 2) {
    for (int i = 0; i < 3; ++i) {
      const double a = -pi / 2 + 2 * pi * i / 3;
      v.push_back({1.25 * std::cos(a), 1.25 * std::sin(a) + 0.15});
    }
  } else if (shape == 3) {
    for (int i = 0; i < 10; ++i) {
      const double a = -pi / 2 + pi * i / 5, r = i % 2 == 0 ? 1.3 : 0.55;
      v.push_back({r * std::cos(a), r * std::sin(a)});
    }
  }
  return v;
}

bool Inside(const std::vector<std::array<double, 2>>& poly, int shape, double x, double y) {
  if (shape == 0) return x * x + y * y <= 1.0;
  bool in = false;
  for (size_t i = 0, j = poly.size() - 1; i < poly.size(); j = i++) {
    const auto& a = poly[i];
    const auto& b = poly[j];
    if ((a[1] > y) != (b[1] > y) && x < (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]) + a[0]) in = !in;
  }
  return in;
}

}  // namespace

const std::vector<std::string>& ShapeNames() {
  static const std::vector<std::string> k = {"circle", "square", "triangle", "star"};
  return k;
}
const std::vector<std::string>& ColorNames() {
  static const std::vector<std::string> k = {"red", "green", "blue", "yellow", "purple", "orange"};
  return k;
}
const std::vector<std::string>& BackgroundNames() {
  static const std::vector<std::string> k = {"white", "gray", "black", "red", "green", "blue"};
  return k;
}
const std::vector<std::string>& SizeNames() {
  static const std::vector<std::string> k = {"small", "medium", "large"};
  return k;
}
const std::vector<std::string>& PositionNames() {
  static const std::vector<std::string> k = {"top left",    "top",    "top right",
                                             "left",        "center", "right",
                                             "bottom left", "bottom", "bottom right"};
  return k;
}

nlohmann::json Scene::ToJson() const {
  nlohmann::json objs = nlohmann::json::array();
  for (const auto& o : objects) {
    objs.push_back({{"shape", ShapeNames()[o.shape]},
                    {"color", ColorNames()[o.color]},
                    {"size", SizeNames()[o.size]},
                    {"position", PositionNames()[o.position]}});
  }
  return {{"objects", objs}, {"background", BackgroundNames()[background]}};
}

bool IsHeldOut(const Object& o, int background) {
  const uint64_t key =
      ((((static_cast<uint64_t>(o.shape) * 8 + o.color) * 4 + o.size) * 16 + o.position) * 8) +
      background;
  return Mix(key ^ 0x5EEDull) % 10 == 0;
}

namespace {

// The grid's outer centers sit this far in (a fraction of the side).
double GridMargin(const std::array<double, 3>& radii) { return std::max(1.0 / 6, 1.05 * radii[2]); }

// Two objects whose grid cells are closer than their radii together would
// overlap; the caption could not say which is in front. With radii up to 0.15
// every pair of cells fits; with the default ones only cells two apart do.
bool Apart(const std::array<double, 3>& radii, const Object& a, const Object& b) {
  const double spacing = (1 - 2 * GridMargin(radii)) / 2;
  const int dx = a.position % 3 - b.position % 3;  // grid columns apart
  const int dy = a.position / 3 - b.position / 3;  // grid rows apart
  return std::hypot(dx, dy) * spacing >= radii[a.size] + radii[b.size];
}

}  // namespace

Scene MakeScene(const SynthOptions& opt, int64_t index) {
  const bool heldout = opt.split == "heldout";
  std::mt19937_64 rng(Mix(opt.seed * 0x100000001B3ull ^ Mix(static_cast<uint64_t>(index)) ^
                          (heldout ? 0xABCDull : 0)));
  auto pick = [&rng](size_t n) { return static_cast<int>(rng() % n); };
  Scene s;
  while (true) {
    s.objects.clear();
    s.background = pick(BackgroundNames().size());
    const bool two =
        !heldout && std::uniform_real_distribution<double>(0, 1)(rng) < opt.two_shape_fraction;
    const int n = two ? 2 : 1;
    bool ok = true;
    for (int k = 0; k < n && ok; ++k) {
      Object o{pick(ShapeNames().size()), pick(ColorNames().size()), pick(SizeNames().size()),
               pick(PositionNames().size())};
      ok = o.color != ClashingColor(s.background) &&
           (k == 0 || (o.position != s.objects[0].position && Apart(opt.radii, o, s.objects[0])));
      ok = ok && (heldout ? IsHeldOut(o, s.background) : !IsHeldOut(o, s.background));
      s.objects.push_back(o);
    }
    if (ok) break;
  }
  s.caption = Caption(s, pick(4));
  return s;
}

torch::Tensor Render(const Scene& s, int64_t res, uint64_t seed, int64_t index,
                     const std::array<double, 3>& radii) {
  std::mt19937_64 rng(Mix(seed ^ Mix(static_cast<uint64_t>(index) + 77)));
  std::uniform_real_distribution<double> u(-1, 1);
  auto jitter = [&](const RGB& c) {
    RGB out;
    for (int i = 0; i < 3; ++i)
      out[i] = std::clamp(c[i] + static_cast<int>(std::lround(10 * u(rng))), 0, 255);
    return out;
  };
  const RGB bg = jitter(BackgroundRGB()[s.background]);
  auto img = torch::empty({res, res, 3}, torch::kFloat32);
  auto a = img.accessor<float, 3>();
  for (int64_t y = 0; y < res; ++y)
    for (int64_t x = 0; x < res; ++x)
      for (int c = 0; c < 3; ++c) a[y][x][c] = static_cast<float>(bg[c]);
  const double margin = GridMargin(radii);
  const double spacing = (1 - 2 * margin) / 2 * static_cast<double>(res);
  constexpr int kSub = 4;
  for (const auto& o : s.objects) {
    const RGB col = jitter(ShapeRGB()[o.color]);
    const double r = radii[o.size] * static_cast<double>(res) * (1 + 0.08 * u(rng));
    const int column = o.position % 3;
    const int row = o.position / 3;
    const double cx = margin * res + spacing * column + 0.1 * spacing * u(rng);
    const double cy = margin * res + spacing * row + 0.1 * spacing * u(rng);
    const auto poly = Polygon(o.shape);
    const int64_t x0 = std::max<int64_t>(0, static_cast<int64_t>(cx - 1.4 * r) - 1);
    const int64_t x1 = std::min<int64_t>(res - 1, static_cast<int64_t>(cx + 1.4 * r) + 1);
    const int64_t y0 = std::max<int64_t>(0, static_cast<int64_t>(cy - 1.4 * r) - 1);
    const int64_t y1 = std::min<int64_t>(res - 1, static_cast<int64_t>(cy + 1.4 * r) + 1);
    for (int64_t y = y0; y <= y1; ++y) {
      for (int64_t x = x0; x <= x1; ++x) {
        int hits = 0;
        for (int sy = 0; sy < kSub; ++sy)
          for (int sx = 0; sx < kSub; ++sx)
            hits += Inside(poly, o.shape, (x + (sx + 0.5) / kSub - cx) / r,
                           (y + (sy + 0.5) / kSub - cy) / r);
        const float cover = static_cast<float>(hits) / (kSub * kSub);
        for (int c = 0; c < 3; ++c)
          a[y][x][c] = a[y][x][c] * (1 - cover) + static_cast<float>(col[c]) * cover;
      }
    }
  }
  return img.round().clamp(0, 255).to(torch::kUInt8);
}

absl::Status WriteDataset(const SynthOptions& o, const std::string& out_dir,
                          const std::string& format, int64_t shard_size) {
  namespace fs = std::filesystem;
  if (o.split != "train" && o.split != "heldout")
    return absl::InvalidArgumentError(
        absl::StrCat("--split must be train or heldout, got \"", o.split, "\""));
  if (format != "png" && format != "jpg")
    return absl::InvalidArgumentError(
        absl::StrCat("--image-format must be png or jpg, got \"", format, "\""));
  if (o.resolution < 16)
    return absl::InvalidArgumentError(
        absl::StrCat("--resolution must be >= 16, got ", o.resolution));
  // A large radius past 0.3 would put the outer grid centers past the middle ones.
  if (!(o.radii[0] > 0 && o.radii[0] < o.radii[1] && o.radii[1] < o.radii[2] && o.radii[2] <= 0.3))
    return absl::InvalidArgumentError(
        absl::StrCat("--radii must be increasing, above 0 and at most 0.3 of the image side, got ",
                     o.radii[0], ",", o.radii[1], ",", o.radii[2]));
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  std::string metadata, shard;
  int64_t shard_index = 0;
  auto flush_shard = [&]() -> absl::Status {
    if (shard.empty()) return absl::OkStatus();
    tar::Finish(shard);
    RETURN_IF_ERROR(WriteFileAtomic(
        (fs::path(out_dir) / absl::StrFormat("shard-%06d.tar", shard_index++)).string(), shard));
    shard.clear();
    return absl::OkStatus();
  };
  for (int64_t i = 0; i < o.count; ++i) {
    const Scene s = MakeScene(o, i);
    const torch::Tensor img = Render(s, o.resolution, o.seed, i, o.radii);
    std::string bytes;
    if (format == "png") {
      ASSIGN_OR_RETURN(bytes, EncodePng(img));
    } else {
      ASSIGN_OR_RETURN(bytes, EncodeJpeg(img, 95));
    }
    const std::string key = absl::StrFormat("%06d", i);
    nlohmann::json meta = s.ToJson();
    meta["text"] = s.caption;
    if (shard_size > 0) {
      RETURN_IF_ERROR(tar::AppendMember(shard, absl::StrCat(key, ".", format), bytes));
      RETURN_IF_ERROR(tar::AppendMember(shard, key + ".txt", s.caption));
      RETURN_IF_ERROR(tar::AppendMember(shard, key + ".json", meta.dump()));
      if ((i + 1) % shard_size == 0) RETURN_IF_ERROR(flush_shard());
    } else {
      const std::string file_name = absl::StrCat(key, ".", format);
      RETURN_IF_ERROR(WriteFileAtomic((fs::path(out_dir) / file_name).string(), bytes));
      nlohmann::json line = {{"file_name", file_name}};
      line.update(meta);
      absl::StrAppend(&metadata, line.dump(), "\n");
    }
  }
  if (shard_size > 0) return flush_shard();
  return WriteFileAtomic((fs::path(out_dir) / "metadata.jsonl").string(), metadata);
}

}  // namespace sd::synth
