#include "common/metrics.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace sd::metrics {
namespace {

bool ValidName(const std::string& n) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                    (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

std::string Num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // Shortest representation that reads back as the same double.
  char buf[32];
  for (int precision = 6; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string EscapeHelp(const std::string& h) {
  std::string out;
  for (char c : h) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string LabelString(const Labels& labels, const std::string& extra_key = "",
                        const std::string& extra_value = "") {
  if (labels.empty() && extra_key.empty()) return "";
  std::string s = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) s += ",";
    s += k + "=\"" + EscapeLabelValue(v) + "\"";
    first = false;
  }
  if (!extra_key.empty()) {
    if (!first) s += ",";
    s += extra_key + "=\"" + extra_value + "\"";
  }
  return s + "}";
}

}  // namespace

std::string EscapeLabelValue(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

const std::vector<double>& Registry::DefaultBuckets() {
  static const std::vector<double> kBuckets = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                               1,     2.5,  5,     10,   30,  60};
  return kBuckets;
}

Registry::Family& Registry::GetFamily(const std::string& name, const std::string& help, Type type) {
  if (!ValidName(name)) throw std::invalid_argument("invalid metric name: " + name);
  auto it = families_.find(name);
  if (it == families_.end()) {
    it = families_.emplace(name, Family{type, help, {}, {}}).first;
  } else if (it->second.type != type) {
    throw std::invalid_argument("metric " + name + " used with two types");
  }
  return it->second;
}

void Registry::CounterAdd(const std::string& name, const std::string& help, const Labels& labels,
                          double v) {
  std::lock_guard<std::mutex> lock(mu_);
  if (v < 0) throw std::invalid_argument("counter " + name + " cannot decrease");
  GetFamily(name, help, Type::kCounter).series[labels].value += v;
}

void Registry::GaugeSet(const std::string& name, const std::string& help, const Labels& labels,
                        double v) {
  std::lock_guard<std::mutex> lock(mu_);
  GetFamily(name, help, Type::kGauge).series[labels].value = v;
}

void Registry::HistogramObserve(const std::string& name, const std::string& help,
                                const Labels& labels, double v,
                                const std::vector<double>& buckets) {
  std::lock_guard<std::mutex> lock(mu_);
  Family& f = GetFamily(name, help, Type::kHistogram);
  if (f.buckets.empty()) f.buckets = buckets;
  Series& s = f.series[labels];
  if (s.bucket_counts.empty()) s.bucket_counts.assign(f.buckets.size(), 0);
  for (size_t i = 0; i < f.buckets.size(); ++i) {
    if (v <= f.buckets[i]) s.bucket_counts[i] += 1;
  }
  s.sum += v;
  s.count += 1;
}

void Registry::Remove(const std::string& name, const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = families_.find(name);
  if (it != families_.end()) it->second.series.erase(labels);
}

std::string Registry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& [name, f] : families_) {
    const char* type = f.type == Type::kCounter ? "counter"
                       : f.type == Type::kGauge ? "gauge"
                                                : "histogram";
    out.append("# HELP ").append(name).append(" ").append(EscapeHelp(f.help));
    out.append("\n# TYPE ").append(name).append(" ").append(type).append("\n");
    for (const auto& [labels, s] : f.series) {
      if (f.type != Type::kHistogram) {
        out += name + LabelString(labels) + " " + Num(s.value) + "\n";
        continue;
      }
      for (size_t i = 0; i < f.buckets.size(); ++i) {
        out += name + "_bucket" + LabelString(labels, "le", Num(f.buckets[i])) + " " +
               Num(s.bucket_counts[i]) + "\n";
      }
      out += name + "_bucket" + LabelString(labels, "le", "+Inf") + " " + Num(s.count) + "\n";
      out += name + "_sum" + LabelString(labels) + " " + Num(s.sum) + "\n";
      out += name + "_count" + LabelString(labels) + " " + Num(s.count) + "\n";
    }
  }
  return out;
}

}  // namespace sd::metrics
