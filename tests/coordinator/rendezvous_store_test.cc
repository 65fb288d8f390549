// The coordinator's rendezvous store: values wait for their keys, a timeout
// names what is missing, a newer generation ends the older one for writers
// and waiters alike, and a waiter whose caller left stops waiting.
#include "coordinator/rendezvous_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "absl/time/clock.h"

namespace lathe::coordinator {
namespace {

TEST(RendezvousStoreTest, GetWaitsForEveryKey) {
  RendezvousStore store;
  ASSERT_TRUE(store.Set(1, "g/0", "zero").ok());
  std::thread late([&] {
    absl::SleepFor(absl::Milliseconds(100));
    ASSERT_TRUE(store.Set(1, "g/1", "one").ok());
  });
  auto values = store.Get(1, {"g/1", "g/0"}, absl::Seconds(10));
  late.join();
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_EQ(*values, (std::vector<std::string>{"one", "zero"}));
  ASSERT_TRUE(store.Set(1, "g/0", "again").ok());
  EXPECT_EQ(store.Get(1, {"g/0"}, absl::ZeroDuration())->front(), "again");
}

TEST(RendezvousStoreTest, TimeoutNamesTheMissingKeys) {
  RendezvousStore store;
  ASSERT_TRUE(store.Set(1, "g/0", "zero").ok());
  const absl::Time start = absl::Now();
  auto values = store.Get(1, {"g/0", "g/7"}, absl::Milliseconds(200));
  EXPECT_TRUE(absl::IsDeadlineExceeded(values.status())) << values.status();
  EXPECT_NE(values.status().message().find("g/7"), std::string::npos);
  EXPECT_EQ(values.status().message().find("g/0,"), std::string::npos);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(200));
  // A generation nobody wrote yet waits too.
  EXPECT_TRUE(absl::IsDeadlineExceeded(store.Get(2, {"g/0"}, absl::Milliseconds(10)).status()));
}

TEST(RendezvousStoreTest, ANewerGenerationEndsTheOlder) {
  RendezvousStore store;
  ASSERT_TRUE(store.Set(1, "g/0", "old").ok());
  absl::Status waiter;
  absl::Time woke;
  std::thread wait([&] {
    waiter = store.Get(1, {"g/1"}, absl::Seconds(30)).status();
    woke = absl::Now();
  });
  absl::SleepFor(absl::Milliseconds(100));
  const absl::Time set = absl::Now();
  ASSERT_TRUE(store.Set(2, "g/1", "new").ok());
  wait.join();
  EXPECT_TRUE(absl::IsFailedPrecondition(waiter)) << waiter;
  EXPECT_LT(woke - set, absl::Seconds(5));
  EXPECT_EQ(store.generation(), 2);
  // Generation 1's keys are gone from generation 2 and generation 1 is over.
  EXPECT_TRUE(absl::IsDeadlineExceeded(store.Get(2, {"g/0"}, absl::ZeroDuration()).status()));
  EXPECT_TRUE(absl::IsFailedPrecondition(store.Set(1, "g/0", "stale")));
  EXPECT_TRUE(absl::IsFailedPrecondition(store.Get(1, {"g/0"}, absl::ZeroDuration()).status()));
  EXPECT_EQ(store.Get(2, {"g/1"}, absl::ZeroDuration())->front(), "new");
}

TEST(RendezvousStoreTest, ACancelledWaitEndsEarly) {
  RendezvousStore store;
  std::atomic<bool> gone{false};
  std::thread leave([&] {
    absl::SleepFor(absl::Milliseconds(200));
    gone = true;
  });
  const absl::Time start = absl::Now();
  auto values = store.Get(1, {"g/0"}, absl::Seconds(30), [&] { return gone.load(); });
  leave.join();
  EXPECT_TRUE(absl::IsCancelled(values.status())) << values.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(RendezvousStoreTest, BadInputIsRefusedAndChangesNothing) {
  RendezvousStore store;
  EXPECT_TRUE(absl::IsInvalidArgument(store.Set(0, "k", "v")));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Set(1, "", "v")));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Set(1, std::string(kMaxStoreKeyBytes + 1, 'k'), "v")));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Set(1, "k", std::string(kMaxStoreValueBytes + 1, 'v'))));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Get(1, {}, absl::ZeroDuration()).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Get(-3, {"k"}, absl::ZeroDuration()).status()));
  EXPECT_EQ(store.generation(), 0);
}

}  // namespace
}  // namespace lathe::coordinator
