#include "sd/data/tar.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace sd::tar {
namespace {
constexpr size_t kBlock = 512;

void Octal(char* field, size_t width, uint64_t value) {
  // width-1 octal digits, NUL-terminated, zero-padded.
  std::memset(field, '0', width - 1);
  field[width - 1] = '\0';
  for (size_t i = width - 1; i-- > 0 && value > 0; value >>= 3)
    field[i] = static_cast<char>('0' + (value & 7));
}

uint64_t ParseOctal(const char* field, size_t width) {
  uint64_t v = 0;
  for (size_t i = 0; i < width && field[i] != '\0'; ++i) {
    if (field[i] == ' ') continue;
    if (field[i] < '0' || field[i] > '7') break;
    v = v * 8 + static_cast<uint64_t>(field[i] - '0');
  }
  return v;
}

uint64_t HeaderSum(const char* h) {
  uint64_t sum = 0;
  for (size_t i = 0; i < kBlock; ++i)
    sum += (i >= 148 && i < 156) ? ' ' : static_cast<unsigned char>(h[i]);
  return sum;
}
}  // namespace

absl::Status AppendMember(std::string& archive, std::string_view name, std::string_view data) {
  if (name.empty() || name.size() >= 100)
    return absl::InvalidArgumentError(
        absl::StrCat("tar member name \"", std::string(name), "\" must be 1-99 bytes"));
  char h[kBlock] = {};
  std::memcpy(h, name.data(), name.size());
  Octal(h + 100, 8, 0644);
  Octal(h + 108, 8, 0);
  Octal(h + 116, 8, 0);
  Octal(h + 124, 12, data.size());
  Octal(h + 136, 12, 0);
  h[156] = '0';
  std::memcpy(h + 257, "ustar", 6);
  std::memcpy(h + 263, "00", 2);
  Octal(h + 148, 7, HeaderSum(h));
  h[155] = ' ';
  archive.append(h, kBlock);
  archive.append(data);
  archive.append((kBlock - data.size() % kBlock) % kBlock, '\0');
  return absl::OkStatus();
}

void Finish(std::string& archive) { archive.append(2 * kBlock, '\0'); }

absl::StatusOr<std::vector<Member>> Index(std::string_view archive, const std::string& origin) {
  std::vector<Member> out;
  uint64_t pos = 0;
  while (pos + kBlock <= archive.size()) {
    const char* h = archive.data() + pos;
    bool zero = true;
    for (size_t i = 0; i < kBlock && zero; ++i) zero = h[i] == '\0';
    if (zero) break;
    if (ParseOctal(h + 148, 8) != HeaderSum(h))
      return absl::DataLossError(absl::StrCat(origin, ": bad tar header checksum at byte ", pos));
    const uint64_t size = ParseOctal(h + 124, 12);
    const uint64_t data = pos + kBlock;
    if (data + size > archive.size())
      return absl::DataLossError(absl::StrCat(origin, ": tar member at byte ", pos, " needs ", size,
                                              " bytes but the archive ends at ", archive.size()));
    const char type = h[156];
    std::string name(h, strnlen(h, 100));
    if (std::memcmp(h + 257, "ustar", 5) == 0 && h[345] != '\0')
      name = absl::StrCat(std::string(h + 345, strnlen(h + 345, 155)), "/", name);
    if (type == '0' || type == '\0') out.push_back({name, data, size});
    pos = data + (size + kBlock - 1) / kBlock * kBlock;
  }
  return out;
}

}  // namespace sd::tar
