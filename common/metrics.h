#pragma once
// A small Prometheus exposition layer (text format 0.0.4): counters, gauges and
// histograms with labels, rendered for /metrics. prometheus-cpp is in no registry
// we can reach, and this is all the daemons need.
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace sd::metrics {

using Labels = std::map<std::string, std::string>;

class Registry {
 public:
  // Each call returns a handle to one labelled series; families are created on
  // first use. Names must match [a-zA-Z_:][a-zA-Z0-9_:]* (checked, throws otherwise).
  void CounterAdd(const std::string& name, const std::string& help, const Labels& labels,
                  double v = 1);
  void GaugeSet(const std::string& name, const std::string& help, const Labels& labels, double v);
  void HistogramObserve(const std::string& name, const std::string& help, const Labels& labels,
                        double v, const std::vector<double>& buckets = DefaultBuckets());
  void Remove(const std::string& name, const Labels& labels);

  std::string Render() const;
  static const std::vector<double>& DefaultBuckets();

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Series {
    double value = 0;  // counter/gauge
    std::vector<double> bucket_counts;
    double sum = 0;
    double count = 0;
  };
  struct Family {
    Type type;
    std::string help;
    std::vector<double> buckets;
    std::map<Labels, Series> series;
  };
  Family& GetFamily(const std::string& name, const std::string& help, Type type);

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

std::string EscapeLabelValue(const std::string& v);

}  // namespace sd::metrics
