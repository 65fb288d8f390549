// Bounded quoting of client input and saturating expiry arithmetic.
#include "core/quote.h"

#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "core/saturating.h"

namespace lathe::runtime {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

TEST(QuoteTest, ShortInputIsQuotedWhole) {
  EXPECT_EQ(QuoteForMessage("run-1"), "'run-1'");
  EXPECT_EQ(QuoteForMessage(""), "''");
  EXPECT_EQ(QuoteForMessage(std::string("a\nb\0'", 5)), "'a\\nb\\x00\\''");
}

TEST(QuoteTest, LongInputIsCutAndItsLengthGiven) {
  const std::string huge(1 << 20, 'x');
  const std::string quoted = QuoteForMessage(huge, 16);
  EXPECT_EQ(quoted, "'xxxxxxxxxxxxxxxx...' (1048576 bytes)");
  EXPECT_LE(QuoteForMessage(std::string(1 << 20, '\xff')).size(), 4 * kQuotedBytes + 32);
}

TEST(QuoteTest, TruncateKeepsWholeUtf8Sequences) {
  EXPECT_EQ(TruncateMessage("short", 100), "short");
  const std::string cut = TruncateMessage(std::string(10, 'a') + "\xc3\xa9" + std::string(100, 'b'), 26);
  EXPECT_EQ(cut, std::string(10, 'a') + "... (truncated)");  // the 2-byte 'é' would not fit whole
  EXPECT_LE(TruncateMessage(std::string(1 << 20, 'm'), 2048).size(), 2048u);
}

TEST(SaturatingTest, ClampsInsteadOfWrapping) {
  EXPECT_EQ(SaturatingAdd(kMax, 1), kMax);
  EXPECT_EQ(SaturatingAdd(kMin, -1), kMin);
  EXPECT_EQ(SaturatingAdd(2, 3), 5);
  EXPECT_EQ(SaturatingMul(kMax, 1000), kMax);
  EXPECT_EQ(SaturatingMul(kMax / 1000 + 1, 1000), kMax);
  EXPECT_EQ(SaturatingMul(kMin, 1000), kMin);
  EXPECT_EQ(SaturatingMul(-kMax, 1000), kMin);
  EXPECT_EQ(SaturatingMul(7, 1000), 7000);
}

TEST(SaturatingTest, ExpiryOfAHugeTtlIsAsLateAsCanBeNeverInThePast) {
  const int64_t now = 1'700'000'000'000;
  EXPECT_EQ(ExpiryUnixMillis(now, 0), 0);
  EXPECT_EQ(ExpiryUnixMillis(now, -5), 0);
  EXPECT_EQ(ExpiryUnixMillis(now, 60), now + 60'000);
  for (int64_t ttl : {kMax, kMax - 1, kMax / 1000, kMax / 1000 - now / 1000 + 1}) {
    EXPECT_EQ(ExpiryUnixMillis(now, ttl), kMax) << ttl;
  }
  EXPECT_GT(ExpiryUnixMillis(now, kMax / 1000 - now / 1000 - 1), now);
}

}  // namespace
}  // namespace lathe::runtime
