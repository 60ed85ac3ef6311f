#pragma once
// Durable job state for the coordinator: SQLite in WAL mode with synchronous=FULL,
// one transaction per change, so a crash loses nothing that was acknowledged.
#include <sqlite3.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/scheduler.h"

namespace sd::coord {

class JobStore {
 public:
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& path);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  // Writes the job, its stages and any events not yet stored, atomically.
  absl::Status Save(const JobRecord& job);
  // Every job, with its spec re-parsed from the stored job.yaml.
  absl::StatusOr<std::vector<JobRecord>> LoadAll() const;

 private:
  explicit JobStore(sqlite3* db) : db_(db) {}
  absl::Status Exec(const std::string& sql) const;
  sqlite3* db_;
  // Events already on disk per job: Save (called on every progress report) only
  // appends the new ones instead of rewriting the whole log.
  mutable std::map<std::string, size_t> events_stored_;
};

}  // namespace sd::coord
