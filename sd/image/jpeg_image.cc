#include "sd/image/jpeg_image.h"

// jpeglib.h needs FILE and size_t declared first.
#include <csetjmp>
#include <cstdio>
#include <cstring>

#include <jpeglib.h>

#include "absl/strings/str_cat.h"
#include "sd/image/png_image.h"

namespace sd {
namespace {

// libjpeg reports fatal errors through a callback that must not return; we
// longjmp back to the caller with the library's message.
struct ErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void OnError(j_common_ptr info) {
  auto* err = reinterpret_cast<ErrorManager*>(info->err);
  (*info->err->format_message)(info, err->message);
  std::longjmp(err->jump, 1);
}

// A truncated or damaged stream is only a warning to libjpeg (it pads with
// gray); for a dataset reader that is a corrupt image.
void OnMessage(j_common_ptr info, int level) {
  if (level < 0) OnError(info);
}

}  // namespace

absl::StatusOr<std::string> EncodeJpeg(const torch::Tensor& image, int quality) {
  if (image.dim() != 3 || image.size(2) != 3 || image.scalar_type() != torch::kUInt8)
    return absl::InvalidArgumentError(absl::StrCat(
        "JPEG encoding needs an [H, W, 3] uint8 image, got ", c10::str(image.sizes())));
  const torch::Tensor u8 = image.contiguous();
  jpeg_compress_struct c{};
  ErrorManager err{};
  c.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = OnError;
  unsigned char* buf = nullptr;
  unsigned long len = 0;  // NOLINT(google-runtime-int): libjpeg's type
  if (setjmp(err.jump)) {
    jpeg_destroy_compress(&c);
    std::free(buf);
    return absl::InternalError(absl::StrCat("libjpeg failed to encode: ", err.message));
  }
  jpeg_create_compress(&c);
  jpeg_mem_dest(&c, &buf, &len);
  c.image_width = static_cast<JDIMENSION>(u8.size(1));
  c.image_height = static_cast<JDIMENSION>(u8.size(0));
  c.input_components = 3;
  c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, quality, TRUE);
  jpeg_start_compress(&c, TRUE);
  const uint8_t* base = u8.data_ptr<uint8_t>();
  while (c.next_scanline < c.image_height) {
    JSAMPROW row =
        const_cast<JSAMPROW>(base + static_cast<size_t>(c.next_scanline) * c.image_width * 3);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::string out(reinterpret_cast<const char*>(buf), len);
  std::free(buf);
  return out;
}

absl::StatusOr<torch::Tensor> DecodeJpeg(std::string_view bytes, const std::string& origin) {
  jpeg_decompress_struct d{};
  ErrorManager err{};
  d.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = OnError;
  err.pub.emit_message = OnMessage;
  torch::Tensor out;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&d);
    return absl::DataLossError(absl::StrCat(origin, ": corrupt JPEG (", err.message, ")"));
  }
  jpeg_create_decompress(&d);
  jpeg_mem_src(&d, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  jpeg_read_header(&d, TRUE);
  d.out_color_space = JCS_RGB;
  jpeg_start_decompress(&d);
  out =
      torch::empty({static_cast<int64_t>(d.output_height), static_cast<int64_t>(d.output_width), 3},
                   torch::kUInt8);
  uint8_t* base = out.data_ptr<uint8_t>();
  while (d.output_scanline < d.output_height) {
    JSAMPROW row = base + static_cast<size_t>(d.output_scanline) * d.output_width * 3;
    jpeg_read_scanlines(&d, &row, 1);
  }
  jpeg_finish_decompress(&d);
  jpeg_destroy_decompress(&d);
  return out;
}

absl::StatusOr<torch::Tensor> DecodeImage(std::string_view bytes, const std::string& origin) {
  static constexpr unsigned char kPng[] = {0x89, 'P', 'N', 'G'};
  if (bytes.size() >= 4 && std::memcmp(bytes.data(), kPng, 4) == 0) return DecodePng(bytes, origin);
  if (bytes.size() >= 3 && static_cast<unsigned char>(bytes[0]) == 0xFF &&
      static_cast<unsigned char>(bytes[1]) == 0xD8)
    return DecodeJpeg(bytes, origin);
  return absl::InvalidArgumentError(
      absl::StrCat(origin, ": neither a PNG nor a JPEG (", bytes.size(), " bytes)"));
}

}  // namespace sd
