#include "coordinator/job_store.h"

#include "stages/catalog.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sd/util/status_macros.h"

namespace sd::coord {
namespace {

// Statement with RAII finalize.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) { rc_ = sqlite3_prepare_v2(db, sql, -1, &s_, nullptr); }
  ~Stmt() { sqlite3_finalize(s_); }
  bool ok() const { return rc_ == SQLITE_OK; }
  sqlite3_stmt* get() const { return s_; }
  // Bytes exactly, whatever they hold (a TEXT binding would be read back up to a NUL).
  void Blob(int i, const std::string& v) {
    sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void Text(int i, const std::string& v) {
    sqlite3_bind_text(s_, i, v.c_str(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void Int(int i, int64_t v) { sqlite3_bind_int64(s_, i, v); }
  void Real(int i, double v) { sqlite3_bind_double(s_, i, v); }

 private:
  sqlite3_stmt* s_ = nullptr;
  int rc_;
};

std::string Col(sqlite3_stmt* s, int i) {
  const unsigned char* t = sqlite3_column_text(s, i);
  return t == nullptr ? "" : reinterpret_cast<const char*>(t);
}

std::string BlobCol(sqlite3_stmt* s, int i) {
  const void* b = sqlite3_column_blob(s, i);
  return b == nullptr ? "" : std::string(static_cast<const char*>(b), sqlite3_column_bytes(s, i));
}

template <typename E>
E ParseState(const std::string& s, E def) {
  for (int i = 0; i <= 5; ++i) {
    if (s == Name(static_cast<E>(i))) return static_cast<E>(i);
  }
  return def;
}

}  // namespace

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open(path.c_str(), &db) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::InternalError(absl::StrCat("cannot open job store ", path, ": ", msg));
  }
  std::unique_ptr<JobStore> store(new JobStore(db));
  RETURN_IF_ERROR(
      store->Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;"));
  RETURN_IF_ERROR(store->Exec(
      "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, yaml TEXT NOT NULL, state TEXT NOT "
      "NULL);"
      "CREATE TABLE IF NOT EXISTS stages (job_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT "
      "NOT NULL,"
      "  state TEXT NOT NULL, restarts INTEGER NOT NULL, step INTEGER NOT NULL, loss REAL NOT NULL,"
      "  PRIMARY KEY (job_id, idx));"
      "CREATE TABLE IF NOT EXISTS events (job_id TEXT NOT NULL, seq INTEGER NOT NULL, text TEXT "
      "NOT NULL,"
      "  PRIMARY KEY (job_id, seq));"
      "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"));
  // Columns added since the first release; a store written before them gets them here.
  for (const char* col :
       {"attempts INTEGER NOT NULL DEFAULT 0", "error TEXT NOT NULL DEFAULT ''"}) {
    absl::Status s = store->Exec(absl::StrCat("ALTER TABLE stages ADD COLUMN ", col));
    if (!s.ok() && s.message().find("duplicate column") == std::string_view::npos) return s;
  }
  return store;
}

JobStore::~JobStore() { sqlite3_close(db_); }

absl::Status JobStore::Exec(const std::string& sql) const {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("job store: ", msg));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> JobStore::AllocateJobNumber() {
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto fail = [&](const char* what) {
    std::string msg = absl::StrCat("job store: ", what, ": ", sqlite3_errmsg(db_));
    Exec("ROLLBACK").IgnoreError();
    return absl::UnavailableError(msg);
  };
  int64_t next = 1;
  {
    Stmt s(db_, "SELECT value FROM meta WHERE key = 'next_job'");
    if (!s.ok()) return fail("reading the job counter");
    if (sqlite3_step(s.get()) == SQLITE_ROW) next = sqlite3_column_int64(s.get(), 0);
  }
  {
    // A store from before the counter: continue after the jobs it holds.
    Stmt s(db_, "SELECT id FROM jobs");
    if (!s.ok()) return fail("reading job ids");
    while (sqlite3_step(s.get()) == SQLITE_ROW) {
      long long n = 0;
      if (sscanf(Col(s.get(), 0).c_str(), "job-%lld", &n) == 1)
        next = std::max<int64_t>(next, n + 1);
    }
  }
  {
    Stmt s(db_, "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_job', ?1)");
    s.Int(1, next + 1);
    if (!s.ok() || sqlite3_step(s.get()) != SQLITE_DONE) return fail("advancing the job counter");
  }
  RETURN_IF_ERROR(Exec("COMMIT"));
  return next;
}

absl::Status JobStore::Save(const JobRecord& job, Durability durability) {
  // In WAL mode synchronous=NORMAL commits without an fsync (the WAL is synced at
  // checkpoints); the setting applies per connection, between transactions.
  const bool relaxed = durability == Durability::kRelaxed;
  if (relaxed) RETURN_IF_ERROR(Exec("PRAGMA synchronous=NORMAL"));
  absl::Status s = SaveLocked(job);
  if (relaxed) Exec("PRAGMA synchronous=FULL").IgnoreError();
  return s;
}

absl::Status JobStore::SaveLocked(const JobRecord& job) {
  RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto fail = [&](const char* what) {
    std::string msg = absl::StrCat("job store: ", what, ": ", sqlite3_errmsg(db_));
    Exec("ROLLBACK").IgnoreError();
    return absl::InternalError(msg);
  };
  {
    Stmt s(db_,
           "INSERT INTO jobs (id, yaml, state) VALUES (?1, ?2, ?3) "
           "ON CONFLICT(id) DO UPDATE SET state = excluded.state");
    s.Text(1, job.id);
    s.Blob(2, job.yaml);
    s.Text(3, Name(job.state));
    if (!s.ok() || sqlite3_step(s.get()) != SQLITE_DONE) return fail("saving job");
  }
  for (size_t i = 0; i < job.stages.size(); ++i) {
    const auto& st = job.stages[i];
    Stmt s(db_,
           "INSERT OR REPLACE INTO stages (job_id, idx, name, state, restarts, step, loss, "
           "attempts, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)");
    s.Text(1, job.id);
    s.Int(2, static_cast<int64_t>(i));
    s.Text(3, st.spec.name);
    s.Text(4, Name(st.state));
    s.Int(5, st.restarts);
    s.Int(6, st.step);
    s.Real(7, st.loss);
    s.Int(8, st.attempts);
    s.Text(9, st.error);
    if (!s.ok() || sqlite3_step(s.get()) != SQLITE_DONE) return fail("saving stage");
  }
  for (size_t i = events_stored_[job.id]; i < job.events.size(); ++i) {
    Stmt s(db_, "INSERT OR IGNORE INTO events (job_id, seq, text) VALUES (?1, ?2, ?3)");
    s.Text(1, job.id);
    s.Int(2, static_cast<int64_t>(i));
    s.Text(3, job.events[i]);
    if (!s.ok() || sqlite3_step(s.get()) != SQLITE_DONE) return fail("saving event");
  }
  RETURN_IF_ERROR(Exec("COMMIT"));
  events_stored_[job.id] = job.events.size();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<JobRecord>> JobStore::LoadAll(double now) const {
  std::vector<JobRecord> out;
  Stmt jobs(db_, "SELECT id, yaml, state FROM jobs ORDER BY id");
  if (!jobs.ok()) return absl::InternalError(absl::StrCat("job store: ", sqlite3_errmsg(db_)));
  while (sqlite3_step(jobs.get()) == SQLITE_ROW) {
    JobRecord j;
    j.id = Col(jobs.get(), 0);
    j.yaml = BlobCol(jobs.get(), 1);
    j.state = ParseState(Col(jobs.get(), 2), JobState::kQueued);
    // A stored job that no longer parses (written by another build, a key since
    // renamed) must not keep the coordinator from starting: it is loaded as failed.
    auto spec = ParseJobSpec(j.yaml, absl::StrCat("stored job ", j.id));
    if (spec.ok()) j.spec = *spec;
    Stmt st(db_,
            "SELECT name, state, restarts, step, loss, attempts, error FROM stages WHERE job_id = "
            "?1 ORDER BY idx");
    st.Text(1, j.id);
    size_t idx = 0;
    while (sqlite3_step(st.get()) == SQLITE_ROW) {
      StageRecord r;
      r.spec = idx < j.spec.stages.size() ? j.spec.stages[idx] : StageSpec{Col(st.get(), 0)};
      r.state = ParseState(Col(st.get(), 1), StageState::kPending);
      r.restarts = sqlite3_column_int64(st.get(), 2);
      r.step = sqlite3_column_int64(st.get(), 3);
      r.loss = sqlite3_column_double(st.get(), 4);
      r.attempts = sqlite3_column_int64(st.get(), 5);
      r.error = Col(st.get(), 6);
      j.stages.push_back(r);
      ++idx;
    }
    Stmt ev(db_, "SELECT text FROM events WHERE job_id = ?1 ORDER BY seq");
    ev.Text(1, j.id);
    while (sqlite3_step(ev.get()) == SQLITE_ROW) j.events.push_back(Col(ev.get(), 0));
    events_stored_[j.id] = j.events.size();
    if (!spec.ok()) {
      const bool ended = Ended(j.state);
      for (auto& r : j.stages) {
        if (!ended && r.state != StageState::kSucceeded) r.state = StageState::kFailed;
      }
      if (!ended) j.state = JobState::kFailed;
      j.events.push_back(absl::StrFormat("%.3f the stored job.yaml no longer parses (%s)%s", now,
                                         spec.status().message(),
                                         ended ? "" : "; the job is marked failed"));
    }
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace sd::coord
