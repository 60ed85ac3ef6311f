#pragma once
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sd {

// fsync of a directory: makes a rename or a new entry in it durable. Best effort.
void FsyncDir(const std::string& dir);

// Reads a whole file; the error names the path.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Writes `data` so that a reader never sees a partial file: temp file in the same
// directory, fsync, rename over the target, fsync the directory.
absl::Status WriteFileAtomic(const std::string& path, std::string_view data);

// Streams pieces into a temp file and renames it into place on Commit(); a writer
// destroyed without Commit() removes its temp file, so a crash leaves the old file.
class AtomicFileWriter {
 public:
  static absl::StatusOr<AtomicFileWriter> Open(const std::string& path);
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  absl::Status Append(const void* data, size_t size);
  absl::Status Commit();

 private:
  AtomicFileWriter(std::string path, std::string tmp, int fd)
      : path_(std::move(path)), tmp_(std::move(tmp)), fd_(fd) {}
  std::string path_;
  std::string tmp_;
  int fd_ = -1;
};

}  // namespace sd
