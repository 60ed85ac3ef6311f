#include "coordinator/job_store.h"

#include "absl/strings/str_cat.h"
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
      "  PRIMARY KEY (job_id, seq));"));
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

absl::Status JobStore::Save(const JobRecord& job) {
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
    s.Text(2, job.yaml);
    s.Text(3, Name(job.state));
    if (!s.ok() || sqlite3_step(s.get()) != SQLITE_DONE) return fail("saving job");
  }
  for (size_t i = 0; i < job.stages.size(); ++i) {
    const auto& st = job.stages[i];
    Stmt s(db_,
           "INSERT OR REPLACE INTO stages (job_id, idx, name, state, restarts, step, loss) "
           "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
    s.Text(1, job.id);
    s.Int(2, static_cast<int64_t>(i));
    s.Text(3, st.spec.name);
    s.Text(4, Name(st.state));
    s.Int(5, st.restarts);
    s.Int(6, st.step);
    s.Real(7, st.loss);
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

absl::StatusOr<std::vector<JobRecord>> JobStore::LoadAll() const {
  std::vector<JobRecord> out;
  Stmt jobs(db_, "SELECT id, yaml, state FROM jobs ORDER BY id");
  if (!jobs.ok()) return absl::InternalError(absl::StrCat("job store: ", sqlite3_errmsg(db_)));
  while (sqlite3_step(jobs.get()) == SQLITE_ROW) {
    JobRecord j;
    j.id = Col(jobs.get(), 0);
    j.yaml = Col(jobs.get(), 1);
    j.state = ParseState(Col(jobs.get(), 2), JobState::kQueued);
    auto spec = ParseJobSpec(j.yaml, absl::StrCat("stored job ", j.id));
    if (!spec.ok()) return spec.status();
    j.spec = *spec;
    Stmt st(db_,
            "SELECT name, state, restarts, step, loss FROM stages WHERE job_id = ?1 ORDER BY idx");
    st.Text(1, j.id);
    size_t idx = 0;
    while (sqlite3_step(st.get()) == SQLITE_ROW) {
      StageRecord r;
      r.spec = idx < j.spec.stages.size() ? j.spec.stages[idx] : StageSpec{Col(st.get(), 0)};
      r.state = ParseState(Col(st.get(), 1), StageState::kPending);
      r.restarts = sqlite3_column_int64(st.get(), 2);
      r.step = sqlite3_column_int64(st.get(), 3);
      r.loss = sqlite3_column_double(st.get(), 4);
      j.stages.push_back(r);
      ++idx;
    }
    Stmt ev(db_, "SELECT text FROM events WHERE job_id = ?1 ORDER BY seq");
    ev.Text(1, j.id);
    while (sqlite3_step(ev.get()) == SQLITE_ROW) j.events.push_back(Col(ev.get(), 0));
    events_stored_[j.id] = j.events.size();
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace sd::coord
