#include "sd/util/file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace sd {
namespace {

absl::Status ErrnoError(std::string_view what, const std::string& path) {
  const std::string msg = absl::StrCat(std::string(what), " ", path, ": ", std::strerror(errno));
  // A full disk or quota is not cured by retrying: callers (the coordinator's
  // restart policy) tell it apart by its code.
  if (errno == ENOSPC || errno == EDQUOT) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

std::string TempNameFor(const std::string& path) {
  std::random_device rd;
  return absl::StrCat(path, ".tmp.", ::getpid(), ".", rd());
}

}  // namespace

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return ss.str();
}

absl::StatusOr<AtomicFileWriter> AtomicFileWriter::Open(const std::string& path) {
  std::string tmp = TempNameFor(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp);
  return AtomicFileWriter(path, std::move(tmp), fd);
}

AtomicFileWriter::AtomicFileWriter(AtomicFileWriter&& other) noexcept
    : path_(std::move(other.path_)), tmp_(std::move(other.tmp_)), fd_(other.fd_) {
  other.fd_ = -1;
  other.tmp_.clear();
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
}

absl::Status AtomicFileWriter::Append(const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("write failed on", tmp_);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status AtomicFileWriter::Commit() {
  if (::fsync(fd_) != 0) return ErrnoError("fsync failed on", tmp_);
  if (::close(fd_) != 0) {
    fd_ = -1;
    return ErrnoError("close failed on", tmp_);
  }
  fd_ = -1;
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) return ErrnoError("rename failed to", path_);
  tmp_.clear();
  // The rename is only durable once the directory entry is on disk.
  const std::string parent = std::filesystem::path(path_).parent_path().string();
  FsyncDir(parent.empty() ? std::string(".") : parent);
  return absl::OkStatus();
}

void FsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

absl::Status WriteFileAtomic(const std::string& path, std::string_view data) {
  auto w = AtomicFileWriter::Open(path);
  if (!w.ok()) return w.status();
  if (auto s = w->Append(data.data(), data.size()); !s.ok()) return s;
  return w->Commit();
}

}  // namespace sd
