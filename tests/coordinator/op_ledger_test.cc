// The op ledger: seq_id ordering with gaps, retry identity, bounds, expiry and
// failure of what cannot complete, driven by a fake clock.
#include "coordinator/op_ledger.h"

#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/coordinator/fake_clock.h"

namespace lathe::coordinator {
namespace {

using lathe::v1::OpError;
using lathe::v1::OpResult;
using lathe::v1::RetrieveResponse;
using lathe::v1::SubmitRequest;

SubmitRequest Noop(const std::string& run_id, int64_t seq_id) {
  SubmitRequest request;
  request.set_run_id(run_id);
  request.set_seq_id(seq_id);
  request.mutable_noop();
  return request;
}

SubmitRequest SaveState(const std::string& run_id, int64_t seq_id, const std::string& name) {
  SubmitRequest request;
  request.set_run_id(run_id);
  request.set_seq_id(seq_id);
  request.mutable_save_state()->set_name(name);
  return request;
}

OpResult NoopResult() {
  OpResult result;
  result.mutable_noop();
  return result;
}

OpError ServerError(absl::StatusCode code, const std::string& message) {
  OpError error;
  error.set_category(OpError::SERVER);
  error.set_code(static_cast<int32_t>(code));
  error.set_message(message);
  return error;
}

class OpLedgerTest : public ::testing::Test {
 protected:
  OpLedgerTest() : ledger_(Options(), &clock_) {}

  static LedgerOptions Options() {
    LedgerOptions options;
    options.gap_timeout = absl::Minutes(10);
    options.result_ttl = absl::Hours(1);
    options.max_unfinished = 8;
    return options;
  }

  // Submits and expects success; returns the op id.
  std::string MustSubmit(const SubmitRequest& request) {
    absl::StatusOr<std::string> op_id = ledger_.Submit(request);
    EXPECT_TRUE(op_id.ok()) << op_id.status();
    return op_id.value_or("");
  }

  // The op ids TakeReady hands out until it has none.
  std::vector<std::string> DrainReady() {
    std::vector<std::string> taken;
    while (std::optional<ReadyOp> op = ledger_.TakeReady()) taken.push_back(op->op_id);
    return taken;
  }

  RetrieveResponse::State StateOf(const std::string& op_id) {
    absl::StatusOr<OpView> view = ledger_.Lookup(op_id);
    EXPECT_TRUE(view.ok()) << view.status();
    return view.ok() ? view->state : RetrieveResponse::STATE_UNSPECIFIED;
  }

  FakeClock clock_;
  OpLedger ledger_;
};

using Ids = std::vector<std::string>;

TEST_F(OpLedgerTest, InOrderSubmitsAreReadyInOrder) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  EXPECT_EQ(MustSubmit(Noop("r", 1)), "r/1");
  EXPECT_EQ(MustSubmit(SaveState("r", 2, "ckpt")), "r/2");
  std::optional<ReadyOp> first = ledger_.TakeReady();
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->op_id, "r/1");
  EXPECT_TRUE(first->request.has_noop());
  std::optional<ReadyOp> second = ledger_.TakeReady();
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->request.save_state().name(), "ckpt");
  EXPECT_EQ(second->request.seq_id(), 2);
  EXPECT_FALSE(ledger_.TakeReady().has_value());
  EXPECT_EQ(StateOf("r/1"), RetrieveResponse::PENDING);  // running
  EXPECT_EQ(ledger_.unfinished(), 2);
}

// After a run's delete_run is accepted, later seq_ids are NotFound while
// earlier ones still run and every accepted op id still answers a retry.
TEST_F(OpLedgerTest, AClosedRunRefusesLaterSeqIdsButAnswersRetries) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  SubmitRequest del = Noop("r", 3);
  del.mutable_delete_run();
  MustSubmit(del);
  EXPECT_EQ(MustSubmit(Noop("r", 2)), "r/2");  // before the deletion: still runs
  absl::StatusOr<std::string> later = ledger_.Submit(Noop("r", 4));
  EXPECT_EQ(later.status().code(), absl::StatusCode::kNotFound) << later.status();
  EXPECT_NE(later.status().message().find("deleted (delete_run at seq_id 3)"), std::string::npos);
  EXPECT_EQ(MustSubmit(del), "r/3");  // a retry
  EXPECT_EQ(DrainReady(), (Ids{"r/1", "r/2", "r/3"}));
  // A delete_run with later operations already waiting is refused.
  ASSERT_TRUE(ledger_.OpenRun("s", 1).ok());
  MustSubmit(Noop("s", 3));
  SubmitRequest early = Noop("s", 2);
  early.mutable_delete_run();
  absl::StatusOr<std::string> refused = ledger_.Submit(early);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("seq_id 3 was accepted after it"), std::string::npos);
}

// A sampling session's requests are ready at once, take none of the run's
// seq_ids (the training client's next seq_id still works), are recognised
// when retried and end with the run.
TEST_F(OpLedgerTest, UnorderedOpsAreReadyAtOnceAndLeaveTheRunsSeqIdsAlone) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 2));  // waits for seq_id 1
  absl::StatusOr<std::string> sample = ledger_.SubmitUnordered(SaveState("r", 1, "a"), "sess-1");
  ASSERT_TRUE(sample.ok()) << sample.status();
  EXPECT_EQ(*sample, "r/sess-1.1");
  EXPECT_EQ(DrainReady(), (Ids{"r/sess-1.1"}));
  EXPECT_EQ(*ledger_.SubmitUnordered(SaveState("r", 1, "a"), "sess-1"), "r/sess-1.1");  // a retry
  EXPECT_EQ(ledger_.SubmitUnordered(SaveState("r", 1, "b"), "sess-1").status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(*ledger_.SubmitUnordered(SaveState("r", 1, "b"), "sess-2"), "r/sess-2.1");
  EXPECT_EQ(MustSubmit(Noop("r", 1)), "r/1");  // the run's seq_id 1 is still free
  EXPECT_EQ(DrainReady(), (Ids{"r/sess-2.1", "r/1", "r/2"}));
  EXPECT_EQ(ledger_.SubmitUnordered(Noop("r", 1), "bad/lane").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ledger_.SubmitUnordered(Noop("nope", 1), "s").status().code(), absl::StatusCode::kNotFound);
  SubmitRequest del = Noop("r", 3);
  del.mutable_delete_run();
  MustSubmit(del);
  EXPECT_EQ(ledger_.SubmitUnordered(Noop("r", 9), "s").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(OpLedgerTest, OutOfOrderSubmitsAreReleasedInSeqOrder) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 3));
  MustSubmit(Noop("r", 2));
  EXPECT_FALSE(ledger_.TakeReady().has_value());  // seq_id 1 is missing
  EXPECT_EQ(StateOf("r/3"), RetrieveResponse::PENDING);
  MustSubmit(Noop("r", 1));
  EXPECT_EQ(DrainReady(), (Ids{"r/1", "r/2", "r/3"}));
}

TEST_F(OpLedgerTest, RetryReturnsTheSameOpIdInAnyState) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 2));
  EXPECT_EQ(MustSubmit(Noop("r", 2)), "r/2");  // buffered
  MustSubmit(Noop("r", 1));
  EXPECT_EQ(MustSubmit(Noop("r", 1)), "r/1");  // ready
  EXPECT_EQ(DrainReady(), (Ids{"r/1", "r/2"}));
  ledger_.Complete("r/1", NoopResult());
  EXPECT_EQ(MustSubmit(Noop("r", 1)), "r/1");  // done
  EXPECT_EQ(StateOf("r/1"), RetrieveResponse::DONE);
  EXPECT_TRUE(ledger_.Lookup("r/1")->result.has_noop());
  EXPECT_FALSE(ledger_.TakeReady().has_value());  // a retry is not run twice
  EXPECT_EQ(ledger_.unfinished(), 1);
}

TEST_F(OpLedgerTest, SameSeqIdWithAnotherRequestIsAlreadyExists) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(SaveState("r", 3, "a"));
  EXPECT_EQ(ledger_.Submit(SaveState("r", 3, "b")).status().code(),
            absl::StatusCode::kAlreadyExists);
  MustSubmit(SaveState("r", 1, "a"));
  ledger_.Complete(DrainReady().at(0), NoopResult());
  EXPECT_EQ(ledger_.Submit(Noop("r", 1)).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(OpLedgerTest, RetryIdentityIgnoresMapInsertionOrder) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  std::vector<std::string> keys;
  for (int i = 0; i < 32; ++i) keys.push_back(absl::StrCat("key", i));
  SubmitRequest forward = Noop("r", 1);
  SubmitRequest backward = Noop("r", 1);
  auto* forward_config = forward.mutable_forward_backward()->mutable_loss_fn_config();
  auto* backward_config = backward.mutable_forward_backward()->mutable_loss_fn_config();
  for (size_t i = 0; i < keys.size(); ++i) {
    (*forward_config)[keys[i]] = static_cast<double>(i);
    const size_t j = keys.size() - 1 - i;
    (*backward_config)[keys[j]] = static_cast<double>(j);
  }
  EXPECT_EQ(MustSubmit(forward), "r/1");
  EXPECT_EQ(MustSubmit(backward), "r/1");
  (*backward_config)["key0"] = 0.5;
  EXPECT_EQ(ledger_.Submit(backward).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(OpLedgerTest, RefusesUnknownRunsAndSeqIdsBelowOne) {
  EXPECT_EQ(ledger_.Submit(Noop("nope", 1)).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ledger_.SubmitInternal(Noop("nope", 0)).status().code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  EXPECT_EQ(ledger_.OpenRun("r", 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(ledger_.HasRun("r"));
  EXPECT_FALSE(ledger_.HasRun("nope"));
  EXPECT_EQ(ledger_.Submit(Noop("r", 0)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ledger_.Submit(Noop("r", -1)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ledger_.unfinished(), 0);
}

TEST_F(OpLedgerTest, InternalOpTakesTheNextExpectedSeqId) {
  ASSERT_TRUE(ledger_.OpenRun("r", 0).ok());
  MustSubmit(Noop("r", 1));  // a user op that arrives before the initialisation
  SubmitRequest init = Noop("r", 42);
  init.clear_noop();
  init.mutable_init()->mutable_lora();
  absl::StatusOr<std::string> init_id = ledger_.SubmitInternal(init);
  ASSERT_TRUE(init_id.ok()) << init_id.status();
  EXPECT_EQ(*init_id, "r/0");
  std::optional<ReadyOp> first = ledger_.TakeReady();
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->op_id, "r/0");
  EXPECT_TRUE(first->request.has_init());
  EXPECT_EQ(first->request.seq_id(), 0);
  EXPECT_EQ(DrainReady(), (Ids{"r/1"}));
}

TEST_F(OpLedgerTest, GapTimeoutFailsBufferedOpsAndTheRunContinues) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 3));
  clock_.Advance(absl::Minutes(6));
  MustSubmit(Noop("r", 2));
  MustSubmit(Noop("r", 5));
  ledger_.Sweep();
  EXPECT_EQ(StateOf("r/3"), RetrieveResponse::PENDING);  // 6 of 10 minutes
  clock_.Advance(absl::Minutes(5));
  ledger_.Sweep();  // r/3 waited 11 minutes, r/2 and r/5 five
  for (const char* op_id : {"r/2", "r/3"}) {
    absl::StatusOr<OpView> view = ledger_.Lookup(op_id);
    ASSERT_TRUE(view.ok());
    EXPECT_EQ(view->state, RetrieveResponse::FAILED) << op_id;
    EXPECT_EQ(view->error.category(), OpError::USER);
    EXPECT_EQ(view->error.code(), static_cast<int>(absl::StatusCode::kDeadlineExceeded));
    EXPECT_NE(view->error.message().find("seq_id 1 of run r"), std::string::npos)
        << view->error.message();
  }
  EXPECT_EQ(StateOf("r/5"), RetrieveResponse::PENDING);  // waits for 4, which is in time
  EXPECT_FALSE(ledger_.TakeReady().has_value());
  EXPECT_EQ(ledger_.Submit(Noop("r", 1)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(MustSubmit(Noop("r", 3)), "r/3");  // a retry of the failed op answers its id
  MustSubmit(Noop("r", 4));
  EXPECT_EQ(DrainReady(), (Ids{"r/4", "r/5"}));
  EXPECT_EQ(ledger_.unfinished(), 2);
}

TEST_F(OpLedgerTest, GapTimeoutReleasesTheOpRightAfterTheFailedOnes) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 2));
  clock_.Advance(absl::Minutes(11));
  MustSubmit(Noop("r", 3));
  ledger_.Sweep();
  EXPECT_EQ(StateOf("r/2"), RetrieveResponse::FAILED);
  EXPECT_EQ(DrainReady(), (Ids{"r/3"}));
}

TEST_F(OpLedgerTest, FinishedOpsExpireAfterTheTtl) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  MustSubmit(Noop("r", 2));
  EXPECT_EQ(DrainReady(), (Ids{"r/1", "r/2"}));
  ledger_.Complete("r/1", NoopResult());
  clock_.Advance(absl::Minutes(30));
  ledger_.Complete("r/2", NoopResult());
  clock_.Advance(absl::Minutes(31));
  ledger_.Sweep();
  EXPECT_EQ(ledger_.Lookup("r/1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ledger_.Submit(Noop("r", 1)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(StateOf("r/2"), RetrieveResponse::DONE);  // finished 31 minutes ago
  clock_.Advance(absl::Minutes(30));
  ledger_.Sweep();
  EXPECT_EQ(ledger_.Lookup("r/2").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(OpLedgerTest, RefusesNewOpsPastMaxUnfinished) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  for (int seq_id = 1; seq_id <= 4; ++seq_id) MustSubmit(Noop("r", seq_id));
  for (int seq_id = 7; seq_id <= 10; ++seq_id) MustSubmit(Noop("r", seq_id));  // buffered
  EXPECT_EQ(ledger_.unfinished(), 8);
  EXPECT_EQ(ledger_.Submit(Noop("r", 5)).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(MustSubmit(Noop("r", 4)), "r/4");    // retries still answer
  EXPECT_EQ(MustSubmit(Noop("r", 9)), "r/9");
  ledger_.Complete(ledger_.TakeReady()->op_id, NoopResult());
  EXPECT_EQ(ledger_.unfinished(), 7);
  EXPECT_EQ(MustSubmit(Noop("r", 5)), "r/5");
}

TEST_F(OpLedgerTest, FailAllFailsEveryUnfinishedOpAndTheRunContinues) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  MustSubmit(Noop("r", 2));
  MustSubmit(Noop("r", 4));
  ASSERT_EQ(ledger_.TakeReady()->op_id, "r/1");  // running; r/2 ready; r/4 buffered
  ledger_.FailAll(ServerError(absl::StatusCode::kUnavailable, "replica lost"));
  for (const char* op_id : {"r/1", "r/2", "r/4"}) {
    absl::StatusOr<OpView> view = ledger_.Lookup(op_id);
    ASSERT_TRUE(view.ok());
    EXPECT_EQ(view->state, RetrieveResponse::FAILED) << op_id;
    EXPECT_EQ(view->error.category(), OpError::SERVER);
    EXPECT_EQ(view->error.message(), "replica lost");
  }
  EXPECT_EQ(ledger_.unfinished(), 0);
  EXPECT_FALSE(ledger_.TakeReady().has_value());
  EXPECT_EQ(ledger_.Submit(Noop("r", 3)).status().code(), absl::StatusCode::kFailedPrecondition);
  MustSubmit(Noop("r", 5));
  EXPECT_EQ(DrainReady(), (Ids{"r/5"}));
}

TEST_F(OpLedgerTest, LateAnswersAfterFailAllAreIgnored) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  ASSERT_TRUE(ledger_.TakeReady().has_value());
  ledger_.FailAll(ServerError(absl::StatusCode::kUnavailable, "replica lost"));
  ledger_.Complete("r/1", NoopResult());
  ledger_.Fail("r/1", ServerError(absl::StatusCode::kInternal, "late"));
  absl::StatusOr<OpView> view = ledger_.Lookup("r/1");
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->state, RetrieveResponse::FAILED);
  EXPECT_EQ(view->error.message(), "replica lost");
  EXPECT_EQ(ledger_.unfinished(), 0);
}

TEST_F(OpLedgerTest, CompleteAndFailApplyToRunningOpsOnly) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  ledger_.Complete("r/1", NoopResult());  // ready, not taken
  EXPECT_EQ(StateOf("r/1"), RetrieveResponse::PENDING);
  ASSERT_TRUE(ledger_.TakeReady().has_value());
  ledger_.Fail("r/1", ServerError(absl::StatusCode::kInternal, "boom"));
  absl::StatusOr<OpView> view = ledger_.Lookup("r/1");
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->state, RetrieveResponse::FAILED);
  EXPECT_EQ(view->error.code(), static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_EQ(ledger_.Lookup("r/9").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(OpLedgerTest, CloseRefusesSubmitsButKeepsResults) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  ledger_.Close();
  EXPECT_EQ(ledger_.Submit(Noop("r", 2)).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ledger_.SubmitInternal(Noop("r", 0)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(StateOf("r/1"), RetrieveResponse::PENDING);
}

TEST_F(OpLedgerTest, WaitReturnsWhenAnotherThreadCompletes) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  ASSERT_TRUE(ledger_.TakeReady().has_value());
  std::thread worker([this] {
    absl::SleepFor(absl::Milliseconds(50));
    ledger_.Complete("r/1", NoopResult());
  });
  const absl::Time start = absl::Now();
  absl::StatusOr<OpView> view = ledger_.Wait("r/1", absl::Seconds(30));
  const absl::Duration waited = absl::Now() - start;
  worker.join();
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->state, RetrieveResponse::DONE);
  EXPECT_LT(waited, absl::Seconds(10));
}

TEST_F(OpLedgerTest, WaitTimesOutWithPending) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  MustSubmit(Noop("r", 1));
  const absl::Time start = absl::Now();
  absl::StatusOr<OpView> view = ledger_.Wait("r/1", absl::Milliseconds(50));
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->state, RetrieveResponse::PENDING);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
  EXPECT_EQ(ledger_.Wait("r/9", absl::Milliseconds(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(OpLedgerTest, WaitReadyWakesOnSubmitAndTimesOut) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  EXPECT_FALSE(ledger_.WaitReady(absl::Milliseconds(20)).has_value());
  std::thread client([this] {
    absl::SleepFor(absl::Milliseconds(50));
    MustSubmit(Noop("r", 1));
  });
  std::optional<ReadyOp> op = ledger_.WaitReady(absl::Seconds(30));
  client.join();
  ASSERT_TRUE(op.has_value());
  EXPECT_EQ(op->op_id, "r/1");
}

TEST_F(OpLedgerTest, RunsAreServedInTheOrderTheirOpsBecameReady) {
  ASSERT_TRUE(ledger_.OpenRun("a", 1).ok());
  ASSERT_TRUE(ledger_.OpenRun("b", 1).ok());
  MustSubmit(Noop("a", 2));
  MustSubmit(Noop("b", 1));
  MustSubmit(Noop("a", 1));  // releases a/1 and a/2 after b/1
  MustSubmit(Noop("b", 2));
  EXPECT_EQ(DrainReady(), (Ids{"b/1", "a/1", "a/2", "b/2"}));
}

TEST_F(OpLedgerTest, ASeqIdFarAheadIsRefusedNamingTheWindowAndLeavesTheRunIntact) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  for (int64_t seq_id : {int64_t{9}, int64_t{1} << 40, std::numeric_limits<int64_t>::max()}) {
    absl::StatusOr<std::string> far = ledger_.Submit(Noop("r", seq_id));
    EXPECT_EQ(far.status().code(), absl::StatusCode::kFailedPrecondition) << seq_id;
    EXPECT_NE(far.status().message().find("window"), std::string::npos) << far.status();
  }
  EXPECT_EQ(ledger_.unfinished(), 0);
  EXPECT_EQ(MustSubmit(Noop("r", 8)), "r/8");  // the last seq_id inside the window (1 + 8 - 1)
  // Past the gap timeout the run moves on to 9; seq_id 1 was never seen, so it
  // is below the position: refused naming a sane seq_id, not a wrapped one.
  clock_.Advance(absl::Minutes(11));
  ledger_.Sweep();
  EXPECT_EQ(StateOf("r/8"), RetrieveResponse::FAILED);
  absl::StatusOr<std::string> late = ledger_.Submit(Noop("r", 1));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(late.status().message().find("next expected seq_id 9"), std::string::npos) << late.status();
  EXPECT_EQ(MustSubmit(Noop("r", 9)), "r/9");
  EXPECT_EQ(DrainReady(), (Ids{"r/9"}));
}

TEST_F(OpLedgerTest, TheWindowMovesWithTheRun) {
  ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
  EXPECT_EQ(ledger_.Submit(Noop("r", 10)).status().code(), absl::StatusCode::kFailedPrecondition);
  for (int seq_id = 1; seq_id <= 3; ++seq_id) MustSubmit(Noop("r", seq_id));
  for (const std::string& op_id : DrainReady()) ledger_.Complete(op_id, NoopResult());
  EXPECT_EQ(MustSubmit(Noop("r", 10)), "r/10");  // position 4: 10 is inside [4, 12)
  EXPECT_EQ(ledger_.Submit(Noop("r", 12)).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(OpLedgerTest, SeqIdsNearInt64MaxNeverWrapThePosition) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  ASSERT_TRUE(ledger_.OpenRun("r", kMax - 2).ok());
  MustSubmit(Noop("r", kMax - 1));
  absl::StatusOr<std::string> top = ledger_.Submit(Noop("r", kMax));
  EXPECT_EQ(top.status().code(), absl::StatusCode::kFailedPrecondition) << top.status();
  MustSubmit(Noop("r", kMax - 2));
  EXPECT_EQ(DrainReady(), (Ids{absl::StrCat("r/", kMax - 2), absl::StrCat("r/", kMax - 1)}));
  // The position is now INT64_MAX; nothing at or past it is accepted and
  // nothing below it is unknown-but-accepted.
  EXPECT_EQ(ledger_.Submit(Noop("r", kMax)).status().code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<std::string> low = ledger_.Submit(Noop("r", 1));
  EXPECT_EQ(low.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(low.status().message().find("-9223372036854775808"), std::string::npos) << low.status();
  clock_.Advance(absl::Hours(2));
  ledger_.Sweep();
  EXPECT_EQ(ledger_.unfinished(), 2);  // the two running ones; nothing wrapped into view
}

TEST_F(OpLedgerTest, MessagesQuoteUnknownIdsShortened) {
  const std::string huge(1 << 20, 'x');
  absl::StatusOr<std::string> submit = ledger_.Submit(Noop(huge, 1));
  EXPECT_EQ(submit.status().code(), absl::StatusCode::kNotFound);
  EXPECT_LT(submit.status().message().size(), 1024u);
  absl::Status lookup = ledger_.Lookup(huge).status();
  EXPECT_EQ(lookup.code(), absl::StatusCode::kNotFound);
  EXPECT_LT(lookup.message().size(), 1024u);
}

}  // namespace
}  // namespace lathe::coordinator
