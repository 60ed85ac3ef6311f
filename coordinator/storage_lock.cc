#include "coordinator/storage_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace sd::coord {

absl::StatusOr<std::unique_ptr<StorageLock>> StorageLock::Acquire(const std::string& storage,
                                                                  const std::string& holder) {
  std::error_code ec;
  std::filesystem::create_directories(storage, ec);
  const std::string path = (std::filesystem::path(storage) / "coordinator.lock").string();
  // The lock is the flock, not the file: it goes away with the process, however
  // it dies, so a crashed coordinator never blocks the next one.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    return absl::UnavailableError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[512] = {0};
    const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
    ::close(fd);
    if (err != EWOULDBLOCK)
      return absl::UnavailableError(absl::StrCat("cannot lock ", path, ": ", std::strerror(err)));
    const std::string who(absl::StripAsciiWhitespace(std::string(buf, n > 0 ? n : 0)));
    return absl::FailedPreconditionError(absl::StrCat(
        "storage ", storage, " is in use by another coordinator (",
        who.empty() ? "holder unknown" : who, "; lock file ", path,
        "). One coordinator owns a storage folder: stop that one or pass another --storage"));
  }
  const std::string text = holder + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, text.data(), text.size(), 0) < 0) {
    // The lock holds without the note; only the message to a second coordinator is poorer.
  }
  return std::unique_ptr<StorageLock>(new StorageLock(fd));
}

StorageLock::~StorageLock() { ::close(fd_); }

}  // namespace sd::coord
