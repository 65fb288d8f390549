// CRC-32C against its standard check values, and incremental use.
#include "core/crc32c.h"
#include <gtest/gtest.h>
#include <string>
namespace lathe::runtime {
TEST(Crc32cTest, KnownValuesAndIncremental) {
  // The standard check value of CRC-32C and RFC 3720's 32 zero bytes.
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  std::string zeros(32, '\0');
  EXPECT_EQ(Crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  std::string text = "the quick brown fox jumps over the lazy dog, twice over";
  EXPECT_EQ(Crc32c(text.data() + 11, text.size() - 11, Crc32c(text.data(), 11)), Crc32c(text.data(), text.size()));
  text[20] ^= 1;
  EXPECT_NE(Crc32c(text.data(), text.size()), Crc32c("the quick brown fox jumps over the lazy dog, twice over", 55));
}
}  // namespace lathe::runtime
