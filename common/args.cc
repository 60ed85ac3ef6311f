#include "common/args.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace sd {

absl::StatusOr<Args> Args::Parse(int argc, char** argv, const std::vector<std::string>& known,
                                 const std::vector<std::string>& repeatable,
                                 const std::vector<std::string>& switches) {
  Args a;
  auto contains = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    // A one-letter switch may be given Unix-style (`sdctl logs JOB -f`).
    if (arg.size() == 2 && arg[0] == '-' && arg[1] != '-' && contains(switches, arg.substr(1))) {
      a.values_[arg.substr(1)].push_back("true");
      continue;
    }
    if (arg.rfind("--", 0) != 0)
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument \"", arg, "\""));
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (contains(switches, name)) {
      a.values_[name].push_back(has_value ? value : "true");
      continue;
    }
    if (!contains(known, name) && !contains(repeatable, name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " (known: --", absl::StrJoin(known, ", --"), ")"));
    }
    if (!has_value) {
      if (i + 1 >= argc)
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      value = argv[++i];
    }
    if (a.values_.count(name) && !contains(repeatable, name)) {
      return absl::InvalidArgumentError(absl::StrCat("flag --", name, " given twice"));
    }
    a.values_[name].push_back(value);
  }
  return a;
}

std::string Args::Get(const std::string& flag, const std::string& def) const {
  auto it = values_.find(flag);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::All(const std::string& flag) const {
  auto it = values_.find(flag);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

absl::StatusOr<int64_t> Args::Int(const std::string& flag, int64_t def) const {
  if (!Has(flag)) return def;
  int64_t v = 0;
  if (!absl::SimpleAtoi(Get(flag), &v))
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " needs an integer, got \"", Get(flag), "\""));
  return v;
}

absl::StatusOr<double> Args::Double(const std::string& flag, double def) const {
  if (!Has(flag)) return def;
  double v = 0;
  if (!absl::SimpleAtod(Get(flag), &v))
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " needs a number, got \"", Get(flag), "\""));
  return v;
}

}  // namespace sd
