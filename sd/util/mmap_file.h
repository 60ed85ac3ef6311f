#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace sd {

// A private (copy-on-write) memory map: a tensor that is later trained in place
// writes to its own pages and never to the checkpoint. Tensors created zero-copy from a checkpoint
// hold a shared_ptr to it, so the mapping lives exactly as long as any tensor using it.
class MappedFile {
 public:
  static absl::StatusOr<std::shared_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Drops the resident pages fully inside [offset, offset+len) from this process;
  // they read back from the file if touched again. Only for ranges nothing has
  // written to (copy-on-write pages would revert to the file's contents).
  void ReleasePages(size_t offset, size_t len) const;

 private:
  MappedFile(std::string path, const unsigned char* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const unsigned char* data_;
  size_t size_;
};

}  // namespace sd
