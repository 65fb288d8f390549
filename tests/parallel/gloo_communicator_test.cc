// Cross-replica Gloo groups between separate processes (not one MPI job),
// formed through a real coordinator's rendezvous store over the replica
// link: every collective on (seed, rank) inputs at several sizes; a member
// killed with SIGKILL mid-run, the survivors failing within the timeout
// instead of hanging, rebuilding the group one generation later without it,
// and a new process joining the generation after that; a stopped member
// turning into a timeout; a stale generation, a missing member and a wrong
// token refused.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "coordinator/coordinator.h"
#include "dp_worker/link_store.h"
#include "parallel/gloo_communicator.h"

extern char** environ;

namespace lathe::coordinator {
namespace {

constexpr char kToken[] = "worker-token-0123456789abcdef";

// A gloo_member process; its output goes to DIR/NAME.log.
struct Member {
  pid_t pid = -1;
  std::string name;
};

class GlooGroupTest : public testing::Test {
 protected:
  void SetUp() override {
    setenv("LATHE_WORKER_TOKEN", kToken, 1);
    dir_ = std::filesystem::path(testing::TempDir()) /
           absl::StrCat("gloo_", testing::UnitTest::GetInstance()->current_test_info()->name(), "_", getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    CoordinatorOptions o;
    o.listen = "127.0.0.1:0";
    auto c = Coordinator::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = std::move(*c);
    address_ = absl::StrCat("127.0.0.1:", coordinator_->port());
  }
  void TearDown() override {
    for (Member& m : members_) {
      if (m.pid > 0) {
        kill(m.pid, SIGKILL);
        waitpid(m.pid, nullptr, 0);
      }
    }
    if (coordinator_) coordinator_->Shutdown("test over", absl::Seconds(1));
    if (!HasFailure()) std::filesystem::remove_all(dir_);
  }

  dp_worker::LinkOptions Link(const std::string& token = kToken) const {
    dp_worker::LinkOptions link;
    link.coordinator = address_;
    link.worker_token = token;
    link.connect_timeout = absl::Seconds(10);
    return link;
  }

  // Index of the member in members_.
  size_t Start(const std::string& name, int seed, const std::vector<std::string>& plan,
               const char* program = LATHE_GLOO_MEMBER) {
    std::vector<std::string> args = {program, address_, dir_.string(), name, std::to_string(seed)};
    args.insert(args.end(), plan.begin(), plan.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    const std::string log = (dir_ / (name + ".log")).string();
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    Member m{-1, name};
    EXPECT_EQ(posix_spawn(&m.pid, argv[0], &actions, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    members_.push_back(m);
    return members_.size() - 1;
  }

  std::string Log(const Member& m) const {
    std::ifstream in(dir_ / (m.name + ".log"));
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  // Whether the member's exit status is 0, waiting up to `timeout`.
  ::testing::AssertionResult Exits0(Member& m, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    int status = 0;
    while (waitpid(m.pid, &status, WNOHANG) == 0) {
      if (absl::Now() > deadline) {
        return ::testing::AssertionFailure() << m.name << " still running after " << timeout << ":\n" << Log(m);
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    m.pid = -1;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << m.name << " ended with status " << status << ":\n" << Log(m);
  }

  // Waits up to `timeout` for STATUS_DIR/`file`.
  bool Appears(const std::string& file, absl::Duration timeout) const {
    const absl::Time deadline = absl::Now() + timeout;
    while (!std::filesystem::exists(dir_ / file)) {
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return true;
  }

  std::filesystem::path dir_;
  std::unique_ptr<Coordinator> coordinator_;
  std::string address_;
  std::vector<Member> members_;
};

TEST_F(GlooGroupTest, EveryCollectiveAcrossSeparateProcesses) {
  // Sizes 1 to 4, one generation each.
  int seed = 11;
  for (int size = 1; size <= 4; ++size) {
    std::vector<size_t> started;
    for (int r = 0; r < size; ++r) {
      started.push_back(
          Start(absl::StrCat("n", size, "r", r), seed, {absl::StrCat(size, ":", r, ":", size, ":next")}));
    }
    for (size_t i : started) EXPECT_TRUE(Exits0(members_[i], absl::Seconds(60)));
    seed += 5;
  }
}

TEST_F(GlooGroupTest, SurvivorsOfAKilledMemberRebuildAndANewcomerJoins) {
  Start("a", 3, {"1:0:3:fail", "2:0:2:next", "3:0:3:next"});
  Start("b", 3, {"1:1:3:fail", "2:1:2:next", "3:1:3:next"});
  Member& c = members_[Start("c", 3, {"1:2:3:fail"})];
  for (const char* n : {"a", "b", "c"}) {
    ASSERT_TRUE(Appears(absl::StrCat(n, ".g1.running"), absl::Seconds(60)))
        << n << "\n" << Log(members_[0]) << Log(members_[1]) << Log(members_[2]);
  }
  ASSERT_EQ(kill(c.pid, SIGKILL), 0);
  const absl::Time killed = absl::Now();
  waitpid(c.pid, nullptr, 0);
  c.pid = -1;
  // Both survivors see the loss as an error within the 5 s collective
  // timeout (plus slack for this loaded machine), not a hang.
  EXPECT_TRUE(Appears("a.g1.failed", absl::Seconds(10))) << Log(members_[0]);
  EXPECT_TRUE(Appears("b.g1.failed", absl::Seconds(10))) << Log(members_[1]);
  std::printf("survivors saw the loss within %s\n", absl::FormatDuration(absl::Now() - killed).c_str());
  // Generation 2 without c: the two survivors check every collective.
  EXPECT_TRUE(Appears("a.g2.done", absl::Seconds(60))) << Log(members_[0]);
  EXPECT_TRUE(Appears("b.g2.done", absl::Seconds(60))) << Log(members_[1]);
  EXPECT_EQ(coordinator_->registry().state(), DeploymentState::kStarting);
  // A newcomer joins generation 3 as its third member.
  Start("d", 3, {"3:2:3:next"});
  for (size_t i : {0, 1, 3}) EXPECT_TRUE(Exits0(members_[i], absl::Seconds(60)));
  // Generation 1 is over: nobody can form it again.
  dp_worker::LinkStore store(Link());
  parallel::StoreGroupOptions o;
  o.generation = 1;
  o.size = 3;
  o.hostname = "127.0.0.1";
  auto stale = parallel::MakeGlooCommunicator(o, &store);
  EXPECT_TRUE(absl::IsFailedPrecondition(stale.status())) << stale.status();
}

// dp_worker loads libtorch, whose libtorch_cpu.so exports a Gloo of its own
// under the same names: with libgloo linked first the group works, with
// libtorch first the backend refuses to start instead of mixing the two.
TEST_F(GlooGroupTest, WorksBesideLibtorchsGlooAndRefusesToUseIt) {
  for (int r = 0; r < 3; ++r) {
    Start(absl::StrCat("t", r), 21, {absl::StrCat("1:", r, ":3:next")}, LATHE_GLOO_MEMBER_TORCH);
  }
  for (size_t i : {0, 1, 2}) EXPECT_TRUE(Exits0(members_[i], absl::Seconds(60)));
  const size_t wrong = Start("wrong", 21, {"2:0:1:next"}, LATHE_GLOO_MEMBER_TORCH_FIRST);
  EXPECT_FALSE(Exits0(members_[wrong], absl::Seconds(60)));
  EXPECT_NE(Log(members_[wrong]).find("FAILED_PRECONDITION"), std::string::npos) << Log(members_[wrong]);
  EXPECT_NE(Log(members_[wrong]).find("libtorch_cpu"), std::string::npos) << Log(members_[wrong]);
}

TEST_F(GlooGroupTest, AStoppedMemberTimesOutItsPeers) {
  Start("a", 8, {"1:0:3:fail", "2:0:2:next"});
  Start("b", 8, {"1:1:3:fail", "2:1:2:next"});
  const size_t c = Start("c", 8, {"1:2:3:fail"});
  for (const char* n : {"a", "b", "c"}) {
    ASSERT_TRUE(Appears(absl::StrCat(n, ".g1.running"), absl::Seconds(60))) << n;
  }
  // Its sockets stay open: only the 5 s collective timeout can tell.
  ASSERT_EQ(kill(members_[c].pid, SIGSTOP), 0);
  EXPECT_TRUE(Appears("a.g1.failed", absl::Seconds(12))) << Log(members_[0]);
  EXPECT_TRUE(Appears("b.g1.failed", absl::Seconds(12))) << Log(members_[1]);
  for (size_t i : {0, 1}) EXPECT_TRUE(Exits0(members_[i], absl::Seconds(60)));
  std::ifstream failed(dir_ / "a.g1.failed");
  std::string why;
  std::getline(failed, why);
  // a either timed out itself or lost b, which had timed out first.
  EXPECT_TRUE(why.rfind("DEADLINE_EXCEEDED", 0) == 0 || why.rfind("UNAVAILABLE", 0) == 0) << why;
}

TEST_F(GlooGroupTest, AMemberThatNeverComesIsADeadline) {
  dp_worker::LinkStore store(Link());
  parallel::StoreGroupOptions o;
  o.generation = 4;
  o.size = 2;
  o.hostname = "127.0.0.1";
  o.connect_timeout = absl::Milliseconds(300);
  const absl::Time start = absl::Now();
  auto alone = parallel::MakeGlooCommunicator(o, &store);
  EXPECT_TRUE(absl::IsDeadlineExceeded(alone.status())) << alone.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  o.rank = 2;
  EXPECT_TRUE(absl::IsInvalidArgument(parallel::MakeGlooCommunicator(o, &store).status()));
  o.rank = 0;
  o.group = "a/b";
  EXPECT_TRUE(absl::IsInvalidArgument(parallel::MakeGlooCommunicator(o, &store).status()));
}

// A member waiting in the store does not hold the coordinator's shutdown
// for the rest of its wait.
TEST_F(GlooGroupTest, ShutdownEndsAStoreWait) {
  dp_worker::LinkStore store(Link());
  absl::Status waited;
  std::thread waiter([&] { waited = store.Get(1, {"replicas/9"}, absl::Seconds(60)).status(); });
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time start = absl::Now();
  coordinator_->Shutdown("test over", absl::Milliseconds(200));
  waiter.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_FALSE(waited.ok());
}

TEST_F(GlooGroupTest, TheStoreWantsTheWorkerToken) {
  dp_worker::LinkStore store(Link("not-the-worker-token-at-all"));
  absl::Status set = store.Set(1, "replicas/0", "x");
  EXPECT_EQ(set.code(), absl::StatusCode::kUnauthenticated) << set;
  dp_worker::LinkStore good(Link());
  EXPECT_TRUE(absl::IsDeadlineExceeded(good.Get(1, {"replicas/0"}, absl::Milliseconds(50)).status()));
}

}  // namespace
}  // namespace lathe::coordinator
