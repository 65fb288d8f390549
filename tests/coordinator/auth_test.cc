// API-key modes and the loopback rule.
#include "coordinator/auth.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

namespace lathe::coordinator {
namespace {

TEST(AuthTest, LoopbackAddresses) {
  EXPECT_TRUE(IsLoopback("127.0.0.1:7777"));
  EXPECT_TRUE(IsLoopback("localhost:0"));
  EXPECT_TRUE(IsLoopback("[::1]:7777"));
  EXPECT_FALSE(IsLoopback("0.0.0.0:7777"));
  EXPECT_FALSE(IsLoopback("[::]:7777"));
  EXPECT_FALSE(IsLoopback("10.1.2.3:7777"));
}

TEST(AuthTest, AutoIsOffOnLoopbackAndNeedsKeysElsewhere) {
  unsetenv("LATHE_API_KEYS");
  auto local = ApiKeys::Load(AuthMode::kAuto, "127.0.0.1:1", "");
  ASSERT_TRUE(local.ok());
  EXPECT_FALSE(local->enabled());
  auto open = ApiKeys::Load(AuthMode::kAuto, "0.0.0.0:1", "");
  EXPECT_EQ(open.status().code(), absl::StatusCode::kFailedPrecondition);
  auto off = ApiKeys::Load(AuthMode::kOff, "0.0.0.0:1", "");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->enabled());
}

TEST(AuthTest, KeysFromFileAndEnvironment) {
  const std::string path = testing::TempDir() + "/keys";
  std::ofstream(path) << "# team keys\nk1\n\n  k2  \n";
  setenv("LATHE_API_KEYS", "k3, k4", 1);
  auto keys = ApiKeys::Load(AuthMode::kAuto, "0.0.0.0:1", path);
  unsetenv("LATHE_API_KEYS");
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_TRUE(keys->enabled());
  EXPECT_EQ(ApiKeys::Load(AuthMode::kOn, "127.0.0.1:1", path + ".missing").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(AuthTest, ParsesModes) {
  EXPECT_EQ(*ParseAuthMode("on"), AuthMode::kOn);
  EXPECT_EQ(*ParseAuthMode("off"), AuthMode::kOff);
  EXPECT_EQ(*ParseAuthMode("auto"), AuthMode::kAuto);
  EXPECT_EQ(ParseAuthMode("yes").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lathe::coordinator
