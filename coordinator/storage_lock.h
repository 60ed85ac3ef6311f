#pragma once
// One coordinator per storage folder. Two coordinators on one --storage would
// both number their jobs from the same store and train into the same folders;
// the second one refuses to start and says who holds the storage.
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace sd::coord {

class StorageLock {
 public:
  // Takes an exclusive flock on <storage>/coordinator.lock for the lifetime of the
  // returned object and writes `holder` (pid, host, address) into it.
  // FailedPrecondition, naming the holder, when another process has it.
  static absl::StatusOr<std::unique_ptr<StorageLock>> Acquire(const std::string& storage,
                                                              const std::string& holder);
  ~StorageLock();
  StorageLock(const StorageLock&) = delete;
  StorageLock& operator=(const StorageLock&) = delete;

 private:
  explicit StorageLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace sd::coord
