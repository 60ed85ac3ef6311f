#pragma once
// The ustar subset WebDataset shards use: regular files, names up to 100 bytes.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace sd::tar {

struct Member {
  std::string name;
  uint64_t offset = 0;  // of the data, from the start of the archive
  uint64_t size = 0;
};

// Appends one member (header + padded data) to `archive`.
absl::Status AppendMember(std::string& archive, std::string_view name, std::string_view data);
// Terminates an archive (two zero blocks).
void Finish(std::string& archive);
// Lists the regular-file members; a bad header checksum or a member running past
// the end is an error naming the archive and the byte offset.
absl::StatusOr<std::vector<Member>> Index(std::string_view archive, const std::string& origin);

}  // namespace sd::tar
