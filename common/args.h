#pragma once
// A small `--flag value` parser for sdctl, the daemons and the tools; errors name the flag.
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sd {

class Args {
 public:
  // `repeatable` flags may be given more than once; `switches` take no value.
  static absl::StatusOr<Args> Parse(int argc, char** argv, const std::vector<std::string>& known,
                                    const std::vector<std::string>& repeatable = {},
                                    const std::vector<std::string>& switches = {});
  bool Has(const std::string& flag) const { return values_.count(flag) > 0; }
  std::string Get(const std::string& flag, const std::string& def = "") const;
  std::vector<std::string> All(const std::string& flag) const;
  absl::StatusOr<int64_t> Int(const std::string& flag, int64_t def) const;
  absl::StatusOr<double> Double(const std::string& flag, double def) const;

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace sd
