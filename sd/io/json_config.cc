#include "sd/io/json_config.h"

#include "absl/strings/str_cat.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd {

absl::StatusOr<JsonConfig> JsonConfig::Load(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON: ", e.what()));
  }
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON object"));
  return FromJson(std::move(j), path);
}

JsonConfig JsonConfig::FromJson(nlohmann::json j, std::string origin) {
  JsonConfig c;
  c.j_ = std::move(j);
  c.origin_ = std::move(origin);
  return c;
}

absl::Status JsonConfig::Error(const std::string& key, const std::string& what) const {
  std::string got = Has(key) ? absl::StrCat(", got ", j_[key].dump()) : "";
  return absl::InvalidArgumentError(absl::StrCat(origin_, ": key \"", key, "\" ", what, got));
}

absl::Status JsonConfig::Positive(const std::string& key, int64_t v) const {
  if (v > 0) return absl::OkStatus();
  return Error(key, "must be positive");
}

absl::Status JsonConfig::Positive(const std::string& key, const std::vector<int64_t>& v) const {
  if (v.empty()) return Error(key, "must not be empty");
  for (const int64_t x : v) {
    if (x <= 0) return Error(key, "entries must be positive");
  }
  return absl::OkStatus();
}

absl::Status JsonConfig::Divides(const std::string& key, const std::vector<int64_t>& divisor,
                                 const std::string& widths_key,
                                 const std::vector<int64_t>& widths) const {
  for (size_t i = 0; i < widths.size(); ++i) {
    const int64_t d = divisor.size() == widths.size() ? divisor[i] : divisor.at(0);
    if (d <= 0) return Error(key, "must be positive");
    if (widths[i] % d != 0)
      return Error(key, widths.size() == 1 ? absl::StrCat("must divide ", widths_key)
                                           : absl::StrCat("must divide each of ", widths_key, " (",
                                                          d, " does not divide ", widths[i], ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> JsonConfig::Int(const std::string& key) const {
  if (!Has(key)) return Error(key, "is required");
  if (!j_[key].is_number_integer()) return Error(key, "must be an integer");
  return j_[key].get<int64_t>();
}
absl::StatusOr<int64_t> JsonConfig::Int(const std::string& key, int64_t def) const {
  return Has(key) ? Int(key) : def;
}
absl::StatusOr<double> JsonConfig::Double(const std::string& key, double def) const {
  if (!Has(key)) return def;
  if (!j_[key].is_number()) return Error(key, "must be a number");
  return j_[key].get<double>();
}
absl::StatusOr<bool> JsonConfig::Bool(const std::string& key, bool def) const {
  if (!Has(key)) return def;
  if (!j_[key].is_boolean()) return Error(key, "must be true or false");
  return j_[key].get<bool>();
}
absl::StatusOr<std::string> JsonConfig::String(const std::string& key,
                                               const std::string& def) const {
  if (!Has(key)) return def;
  if (!j_[key].is_string()) return Error(key, "must be a string");
  return j_[key].get<std::string>();
}
absl::StatusOr<std::vector<int64_t>> JsonConfig::IntList(const std::string& key) const {
  if (!Has(key)) return Error(key, "is required");
  if (!j_[key].is_array()) return Error(key, "must be a list of integers");
  std::vector<int64_t> out;
  for (const auto& v : j_[key]) {
    if (!v.is_number_integer()) return Error(key, "must be a list of integers");
    out.push_back(v.get<int64_t>());
  }
  return out;
}
absl::StatusOr<std::vector<int64_t>> JsonConfig::IntOrList(const std::string& key, size_t n,
                                                           int64_t def) const {
  if (!Has(key)) return std::vector<int64_t>(n, def);
  if (j_[key].is_number_integer()) return std::vector<int64_t>(n, j_[key].get<int64_t>());
  ASSIGN_OR_RETURN(auto v, IntList(key));
  if (v.size() != n) return Error(key, absl::StrCat("must have ", n, " entries, one per block"));
  return v;
}
absl::StatusOr<std::vector<std::string>> JsonConfig::StringList(const std::string& key) const {
  if (!Has(key)) return Error(key, "is required");
  if (!j_[key].is_array()) return Error(key, "must be a list of strings");
  std::vector<std::string> out;
  for (const auto& v : j_[key]) {
    if (!v.is_string()) return Error(key, "must be a list of strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}
absl::StatusOr<std::vector<double>> JsonConfig::DoubleList(const std::string& key) const {
  if (!Has(key)) return Error(key, "is required");
  if (!j_[key].is_array()) return Error(key, "must be a list of numbers");
  std::vector<double> out;
  for (const auto& v : j_[key]) {
    if (!v.is_number()) return Error(key, "must be a list of numbers");
    out.push_back(v.get<double>());
  }
  return out;
}

}  // namespace sd
