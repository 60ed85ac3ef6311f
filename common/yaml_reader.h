#pragma once
// Reading job.yaml one mapping at a time. Errors name the file, the line and the
// key ("job.yaml:4: key \"finetune.lr\" must be a number, got \"fast\""), a
// misspelt key gets the nearest known one suggested, and every key a reader is
// asked for is recorded: what a section accepts is exactly what its parser reads
// (the unknown-key check and docs/job-yaml.md's test use that list).
#include <yaml-cpp/yaml.h>

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace sd {

// " (did you mean \"x\"?)" for the nearest of `known` within a few edits, else "".
std::string Suggest(const std::string& key, const std::vector<std::string>& known);

// What yaml-cpp accepts but a job file must not hold, anywhere in the document: a
// key given twice in one mapping (yaml-cpp keeps the first silently) and a key that
// is a list or mapping.
absl::Status CheckMappings(const YAML::Node& node, const std::string& origin);

class SectionReader {
 public:
  // `where` is the section's name ("" for the top level); `node` may be undefined
  // (the section is absent, every option keeps its default).
  SectionReader(std::string origin, const YAML::Node& node, std::string where);

  bool Has(const std::string& key) const;
  // An error at `key`'s line (or the section's, when the key is absent).
  absl::Status Error(const std::string& key, const std::string& what) const;
  absl::Status String(const std::string& key, std::string& out, const char* what = "a string");
  absl::Status Bool(const std::string& key, bool& out);
  absl::Status Int(const std::string& key, int64_t& out, double lo, double hi);
  // In [lo, hi]; an open end excludes that bound.
  absl::Status Number(const std::string& key, double& out, double lo, double hi,
                      bool lo_open = false, bool hi_open = false);
  absl::Status OneOf(const std::string& key, std::string& out,
                     const std::vector<std::string>& known);
  // A list of integers, each in [lo, hi] (a comma-separated string is accepted
  // too, as run.sh's PROGRESSIVE_STAGES=50,25,12,6 is written).
  absl::Status IntList(const std::string& key, std::vector<int64_t>& out, double lo, double hi);
  // A list of numbers, each in [lo, hi].
  absl::Status NumberList(const std::string& key, std::vector<double>& out, double lo, double hi);
  // The raw node of a key with a shape of its own (a list); recorded like the rest.
  YAML::Node Raw(const std::string& key);

  // Keys of the mapping that are not among `known` (the first one is the error).
  absl::Status CheckKeys(const std::vector<std::string>& known) const;
  const std::vector<std::string>& keys() const { return keys_; }
  std::string Path(const std::string& key) const;
  const std::string& origin() const { return origin_; }

 private:
  template <typename T>
  absl::Status Get(const std::string& key, T& out, const std::string& type_name);
  absl::Status Range(const std::string& key, double v, double lo, double hi, bool lo_open,
                     bool hi_open) const;
  absl::Status ErrorAt(const YAML::Node& n, const std::string& key, const std::string& what) const;

  std::string origin_;
  YAML::Node node_;
  std::string where_;
  std::vector<std::string> keys_;
};

}  // namespace sd
