#pragma once
// Durable job state for the coordinator: SQLite in WAL mode with synchronous=FULL,
// one transaction per change, so a crash loses nothing that was acknowledged.
#include <sqlite3.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/job_scheduler.h"

namespace sd::coord {

class JobStore {
 public:
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& path);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  // The next job number, advanced durably before it is returned: a number is
  // handed out once, even when the job it was meant for is never stored.
  absl::StatusOr<int64_t> AllocateJobNumber();
  // kSynced: fsynced before Save returns (state changes, submits, finishes).
  // kRelaxed: committed to the WAL without an fsync (progress reports, one per
  // step): it survives a coordinator crash, not a power loss of its machine, and
  // the next synced save makes it durable too.
  enum class Durability { kSynced, kRelaxed };
  // Writes the job, its stages and any events not yet stored, atomically.
  absl::Status Save(const JobRecord& job, Durability durability = Durability::kSynced);
  // Every job, with its spec re-parsed from the stored job.yaml; a job whose text
  // no longer parses comes back failed, with the reason as its last event.
  absl::StatusOr<std::vector<JobRecord>> LoadAll(double now = 0) const;

 private:
  explicit JobStore(sqlite3* db) : db_(db) {}
  absl::Status Exec(const std::string& sql) const;
  absl::Status SaveLocked(const JobRecord& job);
  sqlite3* db_;
  // Events already on disk per job: Save (called on every progress report) only
  // appends the new ones instead of rewriting the whole log.
  mutable std::map<std::string, size_t> events_stored_;
};

}  // namespace sd::coord
