// API-key modes, the loopback rule, the worker token and the constant-time
// comparison.
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
  for (const char* key : {"k1", "k2", "k3", "k4"}) EXPECT_TRUE(keys->Contains(key)) << key;
  for (const char* key : {"k", "k5", "# team keys", ""}) EXPECT_FALSE(keys->Contains(key)) << key;
  EXPECT_EQ(ApiKeys::Load(AuthMode::kOn, "127.0.0.1:1", path + ".missing").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(AuthTest, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("secret-token", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret-tokeN", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret-token-and-more", "secret-token"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret-token"));
  // A value repeating the expected one is no match.
  EXPECT_FALSE(ConstantTimeEquals("abab", "ab"));
  EXPECT_FALSE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("x", ""));
}

TEST(AuthTest, WorkerTokenFromFileOrEnvironment) {
  unsetenv("LATHE_WORKER_TOKEN");
  EXPECT_EQ(WorkerToken::Load("").status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(WorkerToken::Load(testing::TempDir() + "/missing").status().code(), absl::StatusCode::kNotFound);
  const std::string path = testing::TempDir() + "/token";
  std::ofstream(path) << "  0123456789abcdef0123  \nsecond line\n";
  auto from_file = WorkerToken::Load(path);
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ(from_file->value(), "0123456789abcdef0123");
  setenv("LATHE_WORKER_TOKEN", "fedcba9876543210fedc", 1);
  EXPECT_EQ(WorkerToken::Load("")->value(), "fedcba9876543210fedc");
  setenv("LATHE_WORKER_TOKEN", "too-short", 1);
  EXPECT_EQ(WorkerToken::Load("").status().code(), absl::StatusCode::kInvalidArgument);
  unsetenv("LATHE_WORKER_TOKEN");
}

TEST(AuthTest, ParsesModes) {
  EXPECT_EQ(*ParseAuthMode("on"), AuthMode::kOn);
  EXPECT_EQ(*ParseAuthMode("off"), AuthMode::kOff);
  EXPECT_EQ(*ParseAuthMode("auto"), AuthMode::kAuto);
  EXPECT_EQ(ParseAuthMode("yes").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lathe::coordinator
