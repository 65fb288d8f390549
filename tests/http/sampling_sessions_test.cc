// The HTTP door's sampling sessions: a creation retried finds its session,
// and the map never holds more than its capacity.
#include "http/sampling_sessions.h"

#include <gtest/gtest.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace lathe::http {
namespace {

TEST(SamplingSessions, ARetriedCreationFindsTheSameSession) {
  SamplingSessions sessions(8);
  const std::string id = sessions.Add("save run-1/3", {"run-1", "lathe://run-1/sampler_weights/ephemeral-3"});
  EXPECT_EQ(id.rfind("sampler-", 0), 0u);
  EXPECT_EQ(sessions.Add("save run-1/3", {"run-2", "other"}), id);
  EXPECT_EQ(sessions.IdOf("save run-1/3"), id);
  ASSERT_TRUE(sessions.Find(id).has_value());
  EXPECT_EQ(sessions.Find(id)->lathe_path, "lathe://run-1/sampler_weights/ephemeral-3");
  EXPECT_NE(sessions.Add("save run-1/4", {"run-1", "p"}), id);
  EXPECT_FALSE(sessions.Find("sampler-0000000000000000").has_value());
  EXPECT_FALSE(sessions.IdOf("save run-1/5").has_value());
}

TEST(SamplingSessions, TheOldestAreForgottenPastTheCapacity) {
  SamplingSessions sessions(3);
  std::string ids[5];
  for (int i = 0; i < 5; ++i) ids[i] = sessions.Add(absl::StrCat("k", i), {"run", absl::StrCat("p", i)});
  EXPECT_FALSE(sessions.Find(ids[0]).has_value());
  EXPECT_FALSE(sessions.Find(ids[1]).has_value());
  EXPECT_FALSE(sessions.IdOf("k1").has_value());
  for (int i = 2; i < 5; ++i) {
    ASSERT_TRUE(sessions.Find(ids[i]).has_value()) << i;
    EXPECT_EQ(sessions.Find(ids[i])->lathe_path, absl::StrCat("p", i));
  }
}

}  // namespace
}  // namespace lathe::http
