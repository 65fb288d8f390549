// Prometheus' text exposition format (version 0.0.4), written by hand: Debian
// 12 packages no prometheus-cpp, and the format is a few lines of text per
// metric family (HELP and TYPE lines, samples with escaped label values,
// histograms as cumulative `_bucket{le=...}`, `_sum` and `_count`).
#ifndef LATHE_COORDINATOR_PROMETHEUS_TEXT_H_
#define LATHE_COORDINATOR_PROMETHEUS_TEXT_H_

#include <string>
#include <utility>
#include <vector>

namespace lathe::coordinator {

using Labels = std::vector<std::pair<std::string, std::string>>;

// Cumulative-bucket histogram of observations (not thread-safe; its owner
// locks). `bounds` are the upper bounds of the finite buckets, ascending.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);
  const std::vector<double>& bounds() const { return bounds_; }
  // counts()[i]: observations <= bounds()[i] (not cumulative); the last
  // entry counts those above every bound.
  const std::vector<double>& counts() const { return counts_; }
  double sum() const { return sum_; }
  double count() const { return count_; }

 private:
  std::vector<double> bounds_;
  std::vector<double> counts_;
  double sum_ = 0, count_ = 0;
};

// Appends metric families to a text body. A family's HELP and TYPE lines are
// written by Family(); its samples follow. Names must match
// [a-zA-Z_:][a-zA-Z0-9_:]* (the caller's constants); label values are
// escaped (backslash, double quote, newline), so client-chosen run ids are safe.
class PrometheusText {
 public:
  // type: "gauge", "counter" or "histogram".
  void Family(const std::string& name, const std::string& type, const std::string& help);
  void Sample(const std::string& name, const Labels& labels, double value);
  // The `_bucket` (with le), `_sum` and `_count` samples of one histogram.
  void HistogramSamples(const std::string& name, const Labels& labels, const Histogram& h);
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

// A label value escaped for the text format.
std::string EscapeLabelValue(const std::string& value);
// A sample value as the format writes it: +Inf, -Inf, NaN or the shortest
// decimal that reads back as the same double.
std::string FormatValue(double value);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_PROMETHEUS_TEXT_H_
