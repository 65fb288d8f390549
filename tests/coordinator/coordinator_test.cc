// Coordinator::Start refuses bad options with a Status and leaves nothing
// half built behind (no crash in the destructor of a failed start).
#include "coordinator/coordinator.h"

#include <gtest/gtest.h>

#include <cstdlib>

namespace lathe::coordinator {
namespace {

CoordinatorOptions Options(const std::string& listen, AuthMode auth) {
  CoordinatorOptions o;
  o.listen = listen;
  o.auth = auth;
  return o;
}

TEST(CoordinatorTest, RequiredKeysMissingIsAnErrorNotACrash) {
  unsetenv("LATHE_API_KEYS");
  auto open = Coordinator::Start(Options("0.0.0.0:0", AuthMode::kAuto));
  EXPECT_EQ(open.status().code(), absl::StatusCode::kFailedPrecondition) << open.status();
  auto on = Coordinator::Start(Options("127.0.0.1:0", AuthMode::kOn));
  EXPECT_EQ(on.status().code(), absl::StatusCode::kFailedPrecondition) << on.status();
}

TEST(CoordinatorTest, AnAddressThatCannotBeBoundIsUnavailable) {
  // 192.0.2.1 (TEST-NET-1) is no address of this machine.
  auto c = Coordinator::Start(Options("192.0.2.1:0", AuthMode::kOff));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
}

TEST(CoordinatorTest, StartsWithKeysOnAnOpenAddress) {
  setenv("LATHE_API_KEYS", "k1", 1);
  auto c = Coordinator::Start(Options("0.0.0.0:0", AuthMode::kAuto));
  unsetenv("LATHE_API_KEYS");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_GT((*c)->port(), 0);
}

}  // namespace
}  // namespace lathe::coordinator
