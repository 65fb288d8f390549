// The hand-written Prometheus text format: escaping, values, histograms.
#include "coordinator/prometheus_text.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace lathe::coordinator {
namespace {

TEST(PrometheusTextTest, EscapesLabelValuesAndHelp) {
  PrometheusText out;
  out.Family("lathe_x", "gauge", "a \\ help\nline");
  out.Sample("lathe_x", {{"run", "a\"b\\c\nd"}, {"op", "fb"}}, 1.5);
  EXPECT_EQ(out.text(),
            "# HELP lathe_x a \\\\ help\\nline\n# TYPE lathe_x gauge\n"
            "lathe_x{run=\"a\\\"b\\\\c\\nd\",op=\"fb\"} 1.5\n");
}

TEST(PrometheusTextTest, ValuesReadBackExactly) {
  for (double v : {0.1, 1.0 / 3, 5.53517723083496, 1e-300, 123456789012345678.0, -2.5}) {
    EXPECT_EQ(std::strtod(FormatValue(v).c_str(), nullptr), v) << FormatValue(v);
  }
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::nan("")), "NaN");
  EXPECT_EQ(FormatValue(3), "3");
}

TEST(PrometheusTextTest, HistogramBucketsAreCumulative) {
  Histogram h({0.1, 1});
  for (double v : {0.05, 0.1, 0.5, 7.0}) h.Observe(v);
  PrometheusText out;
  out.HistogramSamples("lathe_d", {{"op", "x"}}, h);
  EXPECT_EQ(out.text(),
            "lathe_d_bucket{op=\"x\",le=\"0.1\"} 2\n"
            "lathe_d_bucket{op=\"x\",le=\"1\"} 3\n"
            "lathe_d_bucket{op=\"x\",le=\"+Inf\"} 4\n"
            "lathe_d_sum{op=\"x\"} 7.65\n"
            "lathe_d_count{op=\"x\"} 4\n");
}

}  // namespace
}  // namespace lathe::coordinator
