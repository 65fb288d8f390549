// The HTTP door's session liveness: a session silent past the timeout ends,
// one heard from in time stays, a zero timeout never ends one, and the
// registry stays within its capacity; every session that ends is reported
// once.
#include "http/door_sessions.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace lathe::http {
namespace {

const absl::Time kStart = absl::FromUnixSeconds(1000);

TEST(DoorSessionsTest, ASilentSessionEndsAndOneHeardFromStays) {
  DoorSessions sessions(absl::Seconds(10), 16);
  sessions.Add("a", kStart);
  sessions.Add("b", kStart);
  EXPECT_TRUE(sessions.Touch("a", kStart + absl::Seconds(9)));
  EXPECT_TRUE(sessions.Touch("a", kStart + absl::Seconds(18)));
  EXPECT_FALSE(sessions.Touch("b", kStart + absl::Seconds(11)));
  EXPECT_FALSE(sessions.Touch("b", kStart + absl::Seconds(12)));  // forgotten, not revived
  EXPECT_FALSE(sessions.Touch("never", kStart));
  sessions.End("a");
  EXPECT_FALSE(sessions.Touch("a", kStart + absl::Seconds(19)));
}

TEST(DoorSessionsTest, NoTimeoutNeverEnds) {
  DoorSessions sessions(absl::ZeroDuration(), 16);
  sessions.Add("a", kStart);
  EXPECT_TRUE(sessions.Touch("a", kStart + absl::Hours(1000)));
}

TEST(DoorSessionsTest, PastCapacityTheLongestSilentEnds) {
  DoorSessions sessions(absl::Hours(1), 3);
  for (int i = 0; i < 3; ++i) sessions.Add(std::to_string(i), kStart + absl::Seconds(i));
  EXPECT_TRUE(sessions.Touch("0", kStart + absl::Seconds(5)));  // "1" is now the longest silent
  sessions.Add("3", kStart + absl::Seconds(6));
  EXPECT_FALSE(sessions.Touch("1", kStart + absl::Seconds(7)));
  for (const char* id : {"0", "2", "3"}) EXPECT_TRUE(sessions.Touch(id, kStart + absl::Seconds(7))) << id;
}

TEST(DoorSessionsTest, EverySessionThatEndsIsReportedOnce) {
  using Ids = std::vector<std::string>;
  DoorSessions sessions(absl::Seconds(10), 3);
  for (const char* id : {"a", "b", "c"}) sessions.Add(id, kStart);
  EXPECT_EQ(sessions.TakeEnded(kStart), Ids{});
  sessions.End("a");
  sessions.End("a");       // twice: reported once
  sessions.End("unknown");  // never made: not reported
  EXPECT_EQ(sessions.TakeEnded(kStart), Ids{"a"});
  EXPECT_TRUE(sessions.Touch("b", kStart + absl::Seconds(5)));
  // "c" expires; noticed without a call naming it.
  EXPECT_EQ(sessions.TakeEnded(kStart + absl::Seconds(11)), Ids{"c"});
  sessions.Add("d", kStart + absl::Seconds(12));
  sessions.Add("e", kStart + absl::Seconds(12));
  sessions.Add("f", kStart + absl::Seconds(13));  // past capacity: "b", the longest silent, ends
  EXPECT_EQ(sessions.TakeEnded(kStart + absl::Seconds(13)), Ids{"b"});
  EXPECT_EQ(sessions.TakeEnded(kStart + absl::Seconds(13)), Ids{});
}

}  // namespace
}  // namespace lathe::http
