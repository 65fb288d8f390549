// The replica registry: readiness, refused registrations, task round trips,
// and loss by disconnection or silence (fake clock).
#include "coordinator/replica_registry.h"

#include <gtest/gtest.h>

#include <thread>

#include "tests/coordinator/fake_clock.h"

namespace lathe::coordinator {
namespace {

// Records what the registry sends; answers tasks when asked to.
class FakeSink : public ReplicaSink {
 public:
  bool Send(const lathe::v1::CoordinatorMessage& message) override {
    absl::MutexLock lock(&mu);
    sent.push_back(message);
    return true;
  }
  void Cancel() override {
    absl::MutexLock lock(&mu);
    cancelled = true;
  }
  absl::Mutex mu;
  std::vector<lathe::v1::CoordinatorMessage> sent;
  bool cancelled = false;
};

lathe::v1::RegisterReplica Registration(int replica, int replicas = 2, const std::string& model = "m") {
  lathe::v1::RegisterReplica r;
  r.set_replica(replica);
  r.mutable_layout()->set_replicas(replicas);
  r.mutable_layout()->set_ep(2);
  r.mutable_model()->set_base_model(model);
  r.mutable_model()->set_vocab_size(256);
  return r;
}

TEST(ReplicaRegistryTest, ServesOnceEveryReplicaRegistered) {
  FakeClock clock;
  ReplicaRegistry registry(2, absl::Seconds(3), &clock);
  FakeSink a, b;
  EXPECT_EQ(registry.state(), DeploymentState::kStarting);
  ASSERT_TRUE(registry.Register(Registration(1), &b).ok());
  EXPECT_EQ(registry.state(), DeploymentState::kStarting);
  EXPECT_NE(registry.detail().find("waiting for replica(s) 0"), std::string::npos) << registry.detail();
  ASSERT_TRUE(registry.Register(Registration(0), &a).ok());
  EXPECT_EQ(registry.state(), DeploymentState::kServing);
  EXPECT_EQ(registry.model().base_model(), "m");
}

TEST(ReplicaRegistryTest, RefusesBadRegistrations) {
  FakeClock clock;
  ReplicaRegistry registry(2, absl::Seconds(3), &clock);
  FakeSink a, b, c;
  EXPECT_EQ(registry.Register(Registration(2), &a).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register(Registration(0, 3), &a).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(registry.Register(Registration(0), &a).ok());
  EXPECT_EQ(registry.Register(Registration(0), &b).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Register(Registration(1, 2, "other"), &c).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(registry.state(), DeploymentState::kStarting);
}

std::vector<lathe::v1::Task> NoopTasks(int n) {
  std::vector<lathe::v1::Task> tasks(n);
  for (lathe::v1::Task& t : tasks) t.mutable_op()->mutable_noop();
  return tasks;
}

// Two replicas registered; the deployment serves.
class ServingTest : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(registry.Register(Registration(0), &a).ok());
    ASSERT_TRUE(registry.Register(Registration(1), &b).ok());
  }
  FakeClock clock;
  ReplicaRegistry registry{2, absl::Seconds(3), &clock};
  FakeSink a, b;
};

TEST_F(ServingTest, RunOnAllCollectsEveryAnswer) {
  std::thread answer([&] {
    for (FakeSink* sink : {&a, &b}) {
      auto has_task = [sink]() ABSL_SHARED_LOCKS_REQUIRED(sink->mu) { return !sink->sent.empty(); };
      lathe::v1::TaskResult r;
      {
        absl::MutexLock lock(&sink->mu);
        sink->mu.Await(absl::Condition(&has_task));
        r.set_task_id(sink->sent.back().task().task_id());
      }
      r.mutable_result()->mutable_noop();
      registry.Deliver(sink == &a ? 0 : 1, r);
    }
  });
  auto answers = registry.RunOnAll(NoopTasks(2), absl::Seconds(10));
  answer.join();
  ASSERT_TRUE(answers.ok()) << answers.status();
  ASSERT_EQ(answers->size(), 2u);
  EXPECT_NE((*answers)[0].task_id(), (*answers)[1].task_id());
}

TEST_F(ServingTest, ATaskWithoutAnOpIsNotSentAndNeedsNoAnswer) {
  std::vector<lathe::v1::Task> tasks = NoopTasks(2);
  tasks[0].clear_op();
  auto ids = registry.Send(tasks);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ((*ids)[0], -1);
  {
    absl::MutexLock lock(&a.mu);
    EXPECT_TRUE(a.sent.empty());
  }
  EXPECT_EQ(registry.AwaitAnswered({*ids}, absl::Milliseconds(10)), -1);
  lathe::v1::TaskResult r;
  r.set_task_id((*ids)[1]);
  r.mutable_result()->mutable_noop();
  registry.Deliver(1, r);
  EXPECT_EQ(registry.AwaitAnswered({{12345}, *ids}, absl::Seconds(5)), 1);
  auto answers = registry.Collect(*ids, absl::Seconds(1));
  ASSERT_TRUE(answers.ok()) << answers.status();
  EXPECT_FALSE((*answers)[0].has_result());
  EXPECT_TRUE((*answers)[1].has_result());
}

TEST(ReplicaRegistryTest, DisconnectionLosesTheDeploymentAndFailsTheWaiter) {
  FakeClock clock;
  ReplicaRegistry registry(2, absl::Seconds(3), &clock);
  FakeSink a, b;
  std::string lost;
  registry.OnLost([&](const std::string& reason) { lost = reason; });
  ASSERT_TRUE(registry.Register(Registration(0), &a).ok());
  ASSERT_TRUE(registry.Register(Registration(1), &b).ok());
  std::thread leave([&] {
    absl::SleepFor(absl::Milliseconds(50));
    registry.Disconnected(1, "stream broken");
  });
  auto answers = registry.RunOnAll(NoopTasks(2), absl::Seconds(10));
  leave.join();
  EXPECT_EQ(answers.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(registry.state(), DeploymentState::kLost);
  EXPECT_NE(lost.find("replica 1 left: stream broken"), std::string::npos) << lost;
  EXPECT_EQ(registry.RunOnAll(NoopTasks(2), absl::Seconds(1)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(registry.Register(Registration(1), &b).code(), absl::StatusCode::kFailedPrecondition);
}

// The coordinator checks every 200 ms or so.
void AdvanceChecking(FakeClock& clock, ReplicaRegistry& registry, absl::Duration d) {
  for (absl::Duration t; t < d; t += absl::Milliseconds(200)) {
    clock.Advance(absl::Milliseconds(200));
    registry.CheckHeartbeats();
  }
}

TEST_F(ServingTest, SilenceBeyondTheHeartbeatTimeoutLosesTheReplica) {
  AdvanceChecking(clock, registry, absl::Seconds(2));
  registry.Heard(0);
  registry.CheckHeartbeats();
  EXPECT_EQ(registry.state(), DeploymentState::kServing);
  AdvanceChecking(clock, registry, absl::Seconds(2));  // replica 1 silent for 4 s, replica 0 for 2 s
  EXPECT_EQ(registry.state(), DeploymentState::kLost);
  EXPECT_TRUE(b.cancelled);
  EXPECT_FALSE(a.cancelled);
  EXPECT_NE(registry.detail().find("replica 1 sent no heartbeat"), std::string::npos) << registry.detail();
}

// A coordinator paused (SIGSTOP) past the heartbeat timeout blames nobody on
// resuming: the replicas get a fresh window, and a replica that stays silent
// through it is still lost.
TEST_F(ServingTest, ACoordinatorThatStalledDoesNotBlameTheReplicas) {
  AdvanceChecking(clock, registry, absl::Seconds(1));
  clock.Advance(absl::Seconds(30));  // nothing ran
  registry.CheckHeartbeats();
  EXPECT_EQ(registry.state(), DeploymentState::kServing);
  EXPECT_FALSE(a.cancelled || b.cancelled);
  registry.Heard(0);  // its buffered heartbeats arrive
  AdvanceChecking(clock, registry, absl::Seconds(2));
  registry.Heard(0);
  EXPECT_EQ(registry.state(), DeploymentState::kServing);
  AdvanceChecking(clock, registry, absl::Seconds(2));
  EXPECT_EQ(registry.state(), DeploymentState::kLost);
  EXPECT_NE(registry.detail().find("replica 1 sent no heartbeat"), std::string::npos) << registry.detail();
}

TEST(ReplicaRegistryTest, ShutdownTellsEveryReplicaAndIsNotALoss) {
  FakeClock clock;
  ReplicaRegistry registry(2, absl::Seconds(3), &clock);
  FakeSink a, b;
  bool lost = false;
  registry.OnLost([&](const std::string&) { lost = true; });
  ASSERT_TRUE(registry.Register(Registration(0), &a).ok());
  ASSERT_TRUE(registry.Register(Registration(1), &b).ok());
  registry.Shutdown("bye");
  registry.Disconnected(0, "deregistered");
  EXPECT_FALSE(lost);
  EXPECT_EQ(registry.state(), DeploymentState::kShuttingDown);
  ASSERT_FALSE(b.sent.empty());
  EXPECT_EQ(b.sent.back().shutdown().reason(), "bye");
}

}  // namespace
}  // namespace lathe::coordinator

namespace lathe::coordinator {
namespace {

// Replicas that are separate jobs: membership on every task, a lost
// replica leaves the membership and the deployment goes on.
class SeparateJobsTest : public testing::Test {
 protected:
  static lathe::v1::RegisterReplica Separate(int replica, int replicas = 3) {
    lathe::v1::RegisterReplica r = Registration(replica, replicas);
    r.set_separate_job(true);
    return r;
  }
  void SetUp() override {
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(registry.Register(Separate(i), &sinks[i]).ok());
    ASSERT_EQ(registry.state(), DeploymentState::kServing);
  }
  static lathe::v1::Task Last(FakeSink& sink) {
    absl::MutexLock lock(&sink.mu);
    return sink.sent.back().task();
  }
  FakeClock clock;
  ReplicaRegistry registry{3, absl::Seconds(3), &clock};
  FakeSink sinks[3];
};

TEST_F(SeparateJobsTest, TasksCarryTheMembershipTheyRunUnder) {
  EXPECT_EQ(registry.generation(), 1);
  EXPECT_EQ(registry.members(), 3);
  absl::StatusOr<std::vector<int64_t>> ids = registry.Send(NoopTasks(3));
  ASSERT_TRUE(ids.ok()) << ids.status();
  const int64_t epoch = Last(sinks[0]).membership().epoch();
  EXPECT_NE(epoch, 0);
  EXPECT_NE(ReplicaRegistry(3, absl::Seconds(3), &clock).generation(), epoch);  // (0: not serving)
  for (int i = 0; i < 3; ++i) {
    const lathe::v1::Membership m = Last(sinks[i]).membership();
    EXPECT_EQ(m.epoch(), epoch);
    EXPECT_EQ(m.generation(), 1);
    EXPECT_EQ(m.rank(), i);
    EXPECT_EQ(m.size(), 3);
  }
}

TEST_F(SeparateJobsTest, ALostReplicaLeavesTheMembershipAndItsTasksFail) {
  absl::StatusOr<std::vector<int64_t>> ids = registry.Send(NoopTasks(3));
  ASSERT_TRUE(ids.ok());
  for (int i : {0, 2}) {
    lathe::v1::TaskResult r;
    r.set_task_id((*ids)[i]);
    r.mutable_result()->mutable_noop();
    registry.Deliver(i, r);
  }
  registry.Disconnected(1, "stream broke");
  EXPECT_EQ(registry.state(), DeploymentState::kServing);
  EXPECT_EQ(registry.generation(), 2);
  EXPECT_EQ(registry.members(), 2);
  EXPECT_NE(registry.detail().find("replica 1 left: stream broke"), std::string::npos) << registry.detail();
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> answers = registry.Collect(*ids, absl::Seconds(1));
  ASSERT_TRUE(answers.ok()) << answers.status();
  EXPECT_FALSE((*answers)[0].has_error());
  EXPECT_EQ((*answers)[1].error().code(), static_cast<int>(absl::StatusCode::kUnavailable));
  EXPECT_EQ((*answers)[1].error().category(), lathe::v1::OpError::SERVER);
  EXPECT_NE((*answers)[1].error().message().find("replica 1 left"), std::string::npos);
  // A late answer of the replica that left is ignored.
  lathe::v1::TaskResult late;
  late.set_task_id((*ids)[1]);
  registry.Deliver(1, late);

  // The next tasks go to replicas 0 and 2, ranks 0 and 1 of generation 2.
  int split_for = 0;
  ids = registry.SendSplit([&](int n) {
    split_for = n;
    return NoopTasks(n);
  });
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(split_for, 2);
  EXPECT_EQ(Last(sinks[0]).membership().rank(), 0);
  EXPECT_EQ(Last(sinks[2]).membership().rank(), 1);
  EXPECT_EQ(Last(sinks[2]).membership().size(), 2);
  EXPECT_EQ(Last(sinks[2]).membership().generation(), 2);
  {
    absl::MutexLock lock(&sinks[1].mu);
    EXPECT_EQ(sinks[1].sent.size(), 1u);  // only the first task
  }
  // Silence loses another; the last one leaving loses the deployment.
  for (int second = 0; second < 4; ++second) {
    clock.Advance(absl::Seconds(1));
    registry.Heard(0);
    registry.CheckHeartbeats();
  }
  EXPECT_EQ(registry.state(), DeploymentState::kServing) << registry.detail();
  EXPECT_EQ(registry.members(), 1);
  EXPECT_EQ(registry.generation(), 3);
  registry.Disconnected(0, "killed");
  EXPECT_EQ(registry.state(), DeploymentState::kLost);
  EXPECT_NE(registry.detail().find("no replica is left"), std::string::npos) << registry.detail();
}

TEST_F(SeparateJobsTest, AReplicaThatLeftJoinsAgainThroughAStateSync) {
  registry.Disconnected(0, "stream broke");
  EXPECT_EQ(registry.generation(), 2);
  FakeSink again;
  lathe::v1::RegisterReplica in_one_job = Registration(0, 3);
  EXPECT_EQ(registry.Register(in_one_job, &again).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(registry.Register(Separate(0), &again).ok());
  EXPECT_TRUE(registry.joiners());
  // Until admitted it gets no tasks.
  ASSERT_TRUE(registry.Send(NoopTasks(2)).ok());
  {
    absl::MutexLock lock(&again.mu);
    EXPECT_TRUE(again.sent.empty());
  }
  std::vector<lathe::v1::RunInfo> runs(1);
  runs[0].set_run_id("r");
  std::vector<int> admitted;
  absl::StatusOr<std::vector<int64_t>> ids = registry.AdmitJoiners(runs, &admitted);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(admitted, std::vector<int>{0});
  EXPECT_EQ(ids->size(), 3u);
  EXPECT_FALSE(registry.joiners());
  EXPECT_EQ(registry.generation(), 3);
  EXPECT_EQ(registry.members(), 3);
  FakeSink* by_rank[3] = {&again, &sinks[1], &sinks[2]};
  for (int k = 0; k < 3; ++k) {
    const lathe::v1::Task t = Last(*by_rank[k]);
    EXPECT_EQ(t.membership().rank(), k);
    EXPECT_EQ(t.membership().generation(), 3);
    EXPECT_EQ(t.membership().last_loss_generation(), 2);
    EXPECT_EQ(t.sync().source(), 1);  // replica 1, the first that held the state
    EXPECT_EQ(t.sync().runs(0).run_id(), "r");
  }
  EXPECT_TRUE(registry.detail().find("left") == std::string::npos) << registry.detail();
  // A joiner that cannot catch up is expelled: the members go on without it.
  registry.Expel(0, "could not catch up: test");
  EXPECT_EQ(registry.members(), 2);
  EXPECT_EQ(registry.generation(), 4);
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> answers = registry.Collect({(*ids)[0]}, absl::Seconds(1));
  ASSERT_TRUE(answers.ok());
  EXPECT_EQ((*answers)[0].error().code(), static_cast<int>(absl::StatusCode::kUnavailable));
}

TEST(ReplicaRegistryTest, ReplicasInOneJobAndInSeparateJobsDoNotMix) {
  FakeClock clock;
  ReplicaRegistry registry(2, absl::Seconds(3), &clock);
  FakeSink a, b;
  lathe::v1::RegisterReplica separate = Registration(1);
  separate.set_separate_job(true);
  ASSERT_TRUE(registry.Register(Registration(0), &a).ok());
  absl::Status s = registry.Register(separate, &b);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("--replica_index"), std::string::npos) << s;
}

}  // namespace
}  // namespace lathe::coordinator
