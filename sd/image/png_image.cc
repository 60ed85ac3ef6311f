#include "sd/image/png_image.h"

#include <png.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {
void WriteToString(png_structp png, png_bytep data, png_size_t len) {
  static_cast<std::string*>(png_get_io_ptr(png))->append(reinterpret_cast<const char*>(data), len);
}
void NoFlush(png_structp) {}
}  // namespace

absl::StatusOr<std::string> EncodePng(const torch::Tensor& image) {
  if (image.dim() != 3 || image.size(2) != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("PNG encoding needs an [H, W, 3] image, got ", c10::str(image.sizes())));
  }
  torch::Tensor u8 = image.scalar_type() == torch::kUInt8
                         ? image
                         : (image.to(torch::kFloat32).clamp(0, 1) * 255).round().to(torch::kUInt8);
  u8 = u8.to(torch::kCPU).contiguous();
  const int h = static_cast<int>(u8.size(0)), w = static_cast<int>(u8.size(1));
  std::string out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return absl::InternalError("libpng failed to encode the image");
  }
  png_set_write_fn(png, &out, WriteToString, NoFlush);
  png_set_IHDR(png, info, w, h, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  const uint8_t* base = u8.data_ptr<uint8_t>();
  for (int y = 0; y < h; ++y)
    png_write_row(png, const_cast<png_bytep>(base + static_cast<size_t>(y) * w * 3));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

absl::Status WritePng(const std::string& path, const torch::Tensor& image) {
  ASSIGN_OR_RETURN(std::string bytes, EncodePng(image));
  return WriteFileAtomic(path, bytes);
}

namespace {
absl::StatusOr<torch::Tensor> FinishRead(png_image& img, const std::string& origin) {
  img.format = PNG_FORMAT_RGB;
  auto t = torch::empty({static_cast<int64_t>(img.height), static_cast<int64_t>(img.width), 3},
                        torch::kUInt8);
  if (!png_image_finish_read(&img, nullptr, t.data_ptr<uint8_t>(), 0, nullptr)) {
    std::string msg = img.message;
    png_image_free(&img);
    return absl::DataLossError(absl::StrCat(origin, ": corrupt PNG (", msg, ")"));
  }
  return t;
}
}  // namespace

absl::StatusOr<torch::Tensor> ReadPng(const std::string& path) {
  png_image img;
  std::memset(&img, 0, sizeof(img));
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&img, path.c_str())) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a readable PNG (", img.message, ")"));
  }
  return FinishRead(img, path);
}

absl::StatusOr<torch::Tensor> DecodePng(std::string_view bytes, const std::string& origin) {
  png_image img;
  std::memset(&img, 0, sizeof(img));
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&img, bytes.data(), bytes.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": not a readable PNG (", img.message, ")"));
  }
  return FinishRead(img, origin);
}

}  // namespace sd
