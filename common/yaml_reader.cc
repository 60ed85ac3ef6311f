#include "common/yaml_reader.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] =
          std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

std::string Suggest(const std::string& key, const std::vector<std::string>& known) {
  std::string best;
  size_t best_d = 4;  // farther than this is not a typo
  for (const auto& k : known) {
    size_t d = EditDistance(key, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best.empty() ? "" : absl::StrCat(" (did you mean \"", best, "\"?)");
}

absl::Status CheckMappings(const YAML::Node& node, const std::string& origin) {
  if (node.IsSequence()) {
    for (const auto& e : node) RETURN_IF_ERROR(CheckMappings(e, origin));
  }
  if (!node.IsMap()) return absl::OkStatus();
  std::map<std::string, int> first_line;
  for (const auto& kv : node) {
    const int line = kv.first.Mark().line + 1;
    if (!kv.first.IsScalar())
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line, ": a key must be a plain name, not a list or mapping"));
    const auto [it, fresh] = first_line.emplace(kv.first.Scalar(), line);
    if (!fresh)
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ":", line, ": key \"", kv.first.Scalar(),
                       "\" given twice (first on line ", it->second, ")"));
    RETURN_IF_ERROR(CheckMappings(kv.second, origin));
  }
  return absl::OkStatus();
}

SectionReader::SectionReader(std::string origin, const YAML::Node& node, std::string where)
    : origin_(std::move(origin)), node_(node), where_(std::move(where)) {}

std::string SectionReader::Path(const std::string& key) const {
  return where_.empty() ? key : absl::StrCat(where_, ".", key);
}

bool SectionReader::Has(const std::string& key) const {
  return node_.IsDefined() && node_.IsMap() && node_[key].IsDefined();
}

absl::Status SectionReader::ErrorAt(const YAML::Node& n, const std::string& key,
                                    const std::string& what) const {
  return absl::InvalidArgumentError(
      absl::StrCat(origin_, ":", n.Mark().line + 1, ": ",
                   key.empty() ? "" : absl::StrCat("key \"", Path(key), "\" "), what));
}

absl::Status SectionReader::Error(const std::string& key, const std::string& what) const {
  return ErrorAt(Has(key) ? node_[key] : node_, key, what);
}

template <typename T>
absl::Status SectionReader::Get(const std::string& key, T& out, const std::string& type_name) {
  if (std::find(keys_.begin(), keys_.end(), key) == keys_.end()) keys_.push_back(key);
  if (!Has(key)) return absl::OkStatus();
  const YAML::Node n = node_[key];
  if (!n.IsScalar()) return ErrorAt(n, key, absl::StrCat("must be ", type_name));
  try {
    out = n.as<T>();
  } catch (const YAML::Exception&) {
    return ErrorAt(n, key, absl::StrCat("must be ", type_name, ", got \"", n.Scalar(), "\""));
  }
  return absl::OkStatus();
}

absl::Status SectionReader::Range(const std::string& key, double v, double lo, double hi,
                                  bool lo_open, bool hi_open) const {
  const bool bad = (lo_open ? v <= lo : v < lo) || (hi_open ? v >= hi : v > hi);
  if (!bad) return absl::OkStatus();
  return Error(key, absl::StrCat("is ", v, ", out of range ", lo_open ? "(" : "[", lo, ", ", hi,
                                 hi_open ? ")" : "]"));
}

absl::Status SectionReader::String(const std::string& key, std::string& out, const char* what) {
  return Get(key, out, what);
}

absl::Status SectionReader::Bool(const std::string& key, bool& out) {
  return Get(key, out, "true or false");
}

absl::Status SectionReader::Int(const std::string& key, int64_t& out, double lo, double hi) {
  RETURN_IF_ERROR(Get(key, out, "an integer"));
  return Has(key) ? Range(key, static_cast<double>(out), lo, hi, false, false) : absl::OkStatus();
}

absl::Status SectionReader::Number(const std::string& key, double& out, double lo, double hi,
                                   bool lo_open, bool hi_open) {
  RETURN_IF_ERROR(Get(key, out, "a number"));
  return Has(key) ? Range(key, out, lo, hi, lo_open, hi_open) : absl::OkStatus();
}

absl::Status SectionReader::OneOf(const std::string& key, std::string& out,
                                  const std::vector<std::string>& known) {
  const std::string names = absl::StrJoin(known, ", ");
  RETURN_IF_ERROR(Get(key, out, names));
  if (std::find(known.begin(), known.end(), out) != known.end()) return absl::OkStatus();
  return Error(key,
               absl::StrCat("must be one of ", names, ", got \"", out, "\"", Suggest(out, known)));
}

absl::Status SectionReader::NumberList(const std::string& key, std::vector<double>& out, double lo,
                                       double hi) {
  const YAML::Node n = Raw(key);
  if (!n.IsDefined() || n.IsNull()) return absl::OkStatus();
  std::vector<std::string> items;
  if (n.IsScalar()) {
    items = absl::StrSplit(n.Scalar(), ',', absl::SkipWhitespace());
  } else if (n.IsSequence()) {
    for (const auto& e : n) {
      if (!e.IsScalar()) return ErrorAt(e, key, "must be a list of numbers");
      items.push_back(e.Scalar());
    }
  } else {
    return ErrorAt(n, key, "must be a list of numbers");
  }
  if (items.empty()) return ErrorAt(n, key, "must not be empty");
  std::vector<double> values;
  for (const std::string& item : items) {
    double v = 0;
    if (!absl::SimpleAtod(absl::StripAsciiWhitespace(item), &v))
      return ErrorAt(n, key, absl::StrCat("has \"", item, "\", which is not a number"));
    if (v < lo || v > hi)
      return ErrorAt(n, key, absl::StrCat("has ", item, ", out of range [", lo, ", ", hi, "]"));
    values.push_back(v);
  }
  out = std::move(values);
  return absl::OkStatus();
}

absl::Status SectionReader::IntList(const std::string& key, std::vector<int64_t>& out, double lo,
                                    double hi) {
  std::vector<double> values;
  RETURN_IF_ERROR(NumberList(key, values, lo, hi));
  if (values.empty()) return absl::OkStatus();
  std::vector<int64_t> ints;
  for (const double v : values) {
    if (v != std::floor(v)) return Error(key, absl::StrCat("has ", v, ", not an integer"));
    ints.push_back(static_cast<int64_t>(v));
  }
  out = std::move(ints);
  return absl::OkStatus();
}

YAML::Node SectionReader::Raw(const std::string& key) {
  if (std::find(keys_.begin(), keys_.end(), key) == keys_.end()) keys_.push_back(key);
  return Has(key) ? node_[key] : YAML::Node();
}

absl::Status SectionReader::CheckKeys(const std::vector<std::string>& known) const {
  if (!node_.IsDefined() || node_.IsNull()) return absl::OkStatus();
  if (!node_.IsMap())
    return absl::InvalidArgumentError(absl::StrCat(origin_, ":", node_.Mark().line + 1, ": key \"",
                                                   where_, "\" must be a mapping"));
  for (const auto& kv : node_) {
    const std::string k = kv.first.Scalar();
    if (std::find(known.begin(), known.end(), k) == known.end())
      return ErrorAt(kv.first, "",
                     absl::StrCat("unknown key \"", Path(k), "\"", Suggest(k, known)));
  }
  return absl::OkStatus();
}

}  // namespace sd
