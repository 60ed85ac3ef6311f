#pragma once
// Typed access to a model's config.json, with errors that name the file and key.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sd {

class JsonConfig {
 public:
  static absl::StatusOr<JsonConfig> Load(const std::string& path);
  static JsonConfig FromJson(nlohmann::json j, std::string origin);

  bool Has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }
  absl::StatusOr<int64_t> Int(const std::string& key) const;
  absl::StatusOr<int64_t> Int(const std::string& key, int64_t def) const;
  absl::StatusOr<double> Double(const std::string& key, double def) const;
  absl::StatusOr<bool> Bool(const std::string& key, bool def) const;
  absl::StatusOr<std::string> String(const std::string& key, const std::string& def) const;
  absl::StatusOr<std::vector<int64_t>> IntList(const std::string& key) const;
  // An int or a list of ints; a single int is repeated `n` times (diffusers' convention).
  absl::StatusOr<std::vector<int64_t>> IntOrList(const std::string& key, size_t n,
                                                 int64_t def) const;
  absl::StatusOr<std::vector<std::string>> StringList(const std::string& key) const;
  absl::StatusOr<std::vector<double>> DoubleList(const std::string& key) const;

  const nlohmann::json& json() const { return j_; }
  const std::string& origin() const { return origin_; }
  absl::Status Error(const std::string& key, const std::string& what) const;
  // Sizes the model code divides by or allocates with: a zero or negative one
  // would crash (SIGFPE) or build an empty layer instead of failing cleanly.
  absl::Status Positive(const std::string& key, int64_t v) const;
  absl::Status Positive(const std::string& key, const std::vector<int64_t>& v) const;
  // Each of `widths` (read from `widths_key`) must be divisible by `divisor`, the
  // value of `key` (heads, norm groups), per entry when `divisor` has one per width.
  absl::Status Divides(const std::string& key, const std::vector<int64_t>& divisor,
                       const std::string& widths_key, const std::vector<int64_t>& widths) const;

 private:
  nlohmann::json j_;
  std::string origin_;
};

}  // namespace sd
