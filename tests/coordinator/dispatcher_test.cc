// The dispatcher against a registry of fake replicas: pipelined sends, results
// in order, ordering points, refusals and the loss of a replica.
#include "coordinator/dispatcher.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace lathe::coordinator {
namespace {

// A replica that answers each task (a noop result, or an error for
// optim_step) on its own thread, in order, and records how many tasks it
// held at once.
class FakeReplica : public ReplicaSink {
 public:
  FakeReplica(ReplicaRegistry* registry, int index) : registry_(registry), index_(index) {
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeReplica() override {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  bool Send(const lathe::v1::CoordinatorMessage& m) override {
    absl::MutexLock lock(&mu_);
    if (m.has_task()) tasks_.push_back(m.task());
    max_outstanding_ = std::max(max_outstanding_, tasks_.size());
    return true;
  }
  void Cancel() override {}
  void Release() {  // lets the replica answer
    absl::MutexLock lock(&mu_);
    held_ = false;
  }
  size_t max_outstanding() {
    absl::MutexLock lock(&mu_);
    return max_outstanding_;
  }
  std::vector<int64_t> seen_seq_ids() {
    absl::MutexLock lock(&mu_);
    return seen_;
  }
  std::vector<std::string> sampled_from() {  // model_path of each sample task answered
    absl::MutexLock lock(&mu_);
    return sampled_from_;
  }

 private:
  void Serve() {
    for (;;) {
      lathe::v1::Task task;
      {
        absl::MutexLock lock(&mu_);
        auto work = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_ || (!held_ && !tasks_.empty()); };
        mu_.Await(absl::Condition(&work));
        if (stop_) return;
        task = tasks_.front();
        tasks_.pop_front();
        seen_.push_back(task.op().seq_id());
      }
      lathe::v1::TaskResult r;
      r.set_task_id(task.task_id());
      if (task.op().has_optim_step()) {
        r.mutable_error()->set_category(lathe::v1::OpError::USER);
        r.mutable_error()->set_code(3);
        r.mutable_error()->set_message("refused");
      } else if (task.op().has_sample()) {
        r.mutable_result()->mutable_sample();
        absl::MutexLock lock(&mu_);
        sampled_from_.push_back(task.op().sample().model_path());
      } else if (task.op().has_save_weights_for_sampler()) {
        r.mutable_result()->mutable_save_weights_for_sampler()->set_path(
            "lathe://r/sampler_weights/" + task.op().save_weights_for_sampler().name());
      } else {
        r.mutable_result()->mutable_noop();
      }
      registry_->Deliver(index_, r);
    }
  }
  ReplicaRegistry* registry_;
  int index_;
  absl::Mutex mu_;
  std::deque<lathe::v1::Task> tasks_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> seen_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> sampled_from_ ABSL_GUARDED_BY(mu_);
  size_t max_outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  bool held_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

lathe::v1::RegisterReplica Registration(int replica) {
  lathe::v1::RegisterReplica r;
  r.set_replica(replica);
  r.mutable_layout()->set_replicas(2);
  r.mutable_model()->set_base_model("m");
  return r;
}

lathe::v1::SubmitRequest Op(int64_t seq, bool optim = false) {
  lathe::v1::SubmitRequest op;
  op.set_run_id("r");
  op.set_seq_id(seq);
  if (optim) op.mutable_optim_step();
  else op.mutable_init();
  return op;
}

lathe::v1::SubmitRequest SampleOp(int64_t seq) {
  lathe::v1::SubmitRequest op = Op(seq);
  op.mutable_sample()->set_num_samples(1);
  return op;
}

class DispatcherTest : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(registry_.Register(Registration(0), &a_).ok());
    ASSERT_TRUE(registry_.Register(Registration(1), &b_).ok());
    ASSERT_TRUE(ledger_.OpenRun("r", 1).ok());
    dispatcher_.Start();
  }
  void TearDown() override { dispatcher_.Stop(); }
  OpView WaitFor(const std::string& id) { return *ledger_.Wait(id, absl::Seconds(10)); }

  OpLedger ledger_{LedgerOptions()};
  ReplicaRegistry registry_{2, absl::Seconds(30)};
  FakeReplica a_{&registry_, 0}, b_{&registry_, 1};
  Dispatcher dispatcher_{&ledger_, &registry_, absl::Seconds(30), /*depth=*/3};
};

TEST_F(DispatcherTest, KeepsUpToDepthOperationsOnTheReplicasAndFinishesInOrder) {
  std::vector<std::string> ids;
  for (int64_t seq = 1; seq <= 6; ++seq) ids.push_back(*ledger_.Submit(Op(seq)));
  absl::SleepFor(absl::Milliseconds(300));  // the replicas hold their tasks
  EXPECT_EQ(a_.max_outstanding(), 3u);
  EXPECT_EQ(ledger_.Lookup(ids[0])->state, lathe::v1::RetrieveResponse::PENDING);
  a_.Release();
  b_.Release();
  for (const std::string& id : ids) EXPECT_EQ(WaitFor(id).state, lathe::v1::RetrieveResponse::DONE) << id;
  EXPECT_EQ(a_.seen_seq_ids(), (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  EXPECT_LE(b_.max_outstanding(), 3u);
}

TEST_F(DispatcherTest, SamplingRequestsGoOutBeyondTheDepthAndTheNextTrainingOpWaits) {
  std::vector<std::string> ids;
  for (int64_t seq = 1; seq <= 10; ++seq) ids.push_back(*ledger_.Submit(SampleOp(seq)));
  ids.push_back(*ledger_.Submit(Op(11)));  // a training operation after them
  absl::SleepFor(absl::Milliseconds(300));
  // Sampling requests are spread by seq_id: five on each replica (the other
  // replica gets nothing), all out at once (depth is 3); the training
  // operation is not sent yet.
  EXPECT_EQ(a_.max_outstanding(), 5u);
  EXPECT_EQ(b_.max_outstanding(), 5u);
  a_.Release();
  b_.Release();
  for (const std::string& id : ids) EXPECT_EQ(WaitFor(id).state, lathe::v1::RetrieveResponse::DONE) << id;
  EXPECT_EQ(a_.seen_seq_ids(), (std::vector<int64_t>{2, 4, 6, 8, 10, 11}));
}

TEST_F(DispatcherTest, ASamplingRequestCompletesBeforeAnEarlierOperationThatIsStillOut) {
  b_.Release();  // replica a holds its tasks
  const std::string training = *ledger_.Submit(Op(1));      // on both replicas
  const std::string on_a = *ledger_.Submit(SampleOp(2));    // replica 0
  const std::string on_b = *ledger_.Submit(SampleOp(3));    // replica 1
  EXPECT_EQ(WaitFor(on_b).state, lathe::v1::RetrieveResponse::DONE);
  EXPECT_EQ(ledger_.Lookup(training)->state, lathe::v1::RetrieveResponse::PENDING);
  EXPECT_EQ(ledger_.Lookup(on_a)->state, lathe::v1::RetrieveResponse::PENDING);
  a_.Release();
  EXPECT_EQ(WaitFor(training).state, lathe::v1::RetrieveResponse::DONE);
  EXPECT_EQ(WaitFor(on_a).state, lathe::v1::RetrieveResponse::DONE);
}

TEST_F(DispatcherTest, AnUnpinnedSampleFollowsTheNewestVersionPublishedBeforeIt) {
  lathe::v1::RunInfo run;
  run.set_run_id("r");
  dispatcher_.AddRun(run);
  a_.Release();
  b_.Release();
  auto publish = [](int64_t seq, const std::string& name) {
    lathe::v1::SubmitRequest op = Op(seq);
    op.mutable_save_weights_for_sampler()->set_name(name);
    return op;
  };
  lathe::v1::SubmitRequest base = SampleOp(5);
  base.mutable_sample()->set_base(true);
  // Odd seq_ids sample on replica 1. Each is submitted right behind the
  // publication before it, before that one's answer is in.
  std::vector<std::string> ids;
  for (const lathe::v1::SubmitRequest& op :
       {SampleOp(1), publish(2, "v1"), SampleOp(3), publish(4, "v2"), base, SampleOp(6), SampleOp(7)}) {
    ids.push_back(*ledger_.Submit(op));
  }
  for (const std::string& id : ids) EXPECT_EQ(WaitFor(id).state, lathe::v1::RetrieveResponse::DONE) << id;
  EXPECT_EQ(b_.sampled_from(), (std::vector<std::string>{"", "lathe://r/sampler_weights/v1", "",
                                                         "lathe://r/sampler_weights/v2"}));
  EXPECT_EQ(a_.sampled_from(), (std::vector<std::string>{"lathe://r/sampler_weights/v2"}));
}

TEST_F(DispatcherTest, AnOrderingPointWaitsForEverythingBeforeIt) {
  const std::string first = *ledger_.Submit(Op(1));
  lathe::v1::SubmitRequest noop = Op(2);
  noop.mutable_noop();
  const std::string point = *ledger_.Submit(noop);
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(ledger_.Lookup(point)->state, lathe::v1::RetrieveResponse::PENDING);
  a_.Release();
  b_.Release();
  EXPECT_EQ(WaitFor(point).state, lathe::v1::RetrieveResponse::DONE);
  EXPECT_EQ(ledger_.Lookup(first)->state, lathe::v1::RetrieveResponse::DONE);
}

TEST_F(DispatcherTest, AReplicaErrorFailsTheOperationAndTheNextOneStillRuns) {
  a_.Release();
  b_.Release();
  const OpView failed = WaitFor(*ledger_.Submit(Op(1, /*optim=*/true)));
  EXPECT_EQ(failed.state, lathe::v1::RetrieveResponse::FAILED);
  EXPECT_EQ(failed.error.message(), "refused");
  EXPECT_EQ(WaitFor(*ledger_.Submit(Op(2))).state, lathe::v1::RetrieveResponse::DONE);
}

TEST_F(DispatcherTest, LosingAReplicaFailsEveryOperationOnIt) {
  std::vector<std::string> ids;
  for (int64_t seq = 1; seq <= 3; ++seq) ids.push_back(*ledger_.Submit(Op(seq)));
  absl::SleepFor(absl::Milliseconds(100));
  registry_.Disconnected(1, "killed");
  for (const std::string& id : ids) {
    const OpView v = WaitFor(id);
    EXPECT_EQ(v.state, lathe::v1::RetrieveResponse::FAILED) << id;
    EXPECT_EQ(v.error.code(), static_cast<int>(absl::StatusCode::kUnavailable)) << id;
  }
  a_.Release();
}

}  // namespace
}  // namespace lathe::coordinator

namespace lathe::coordinator {
namespace {

// After a restart: ops the journal holds unfinished are settled from the
// answers the replicas kept (all answered: the result; some: failed), and
// the others run now, once.
TEST(DispatcherRecovery, SettlesFromKeptAnswersAndRunsTheRestOnce) {
  OpLedger ledger{LedgerOptions()};
  std::vector<lathe::v1::JournalRecord> records(5);
  records[0].mutable_run()->set_run_id("r");
  records[0].mutable_run()->mutable_info()->set_run_id("r");
  records[1].mutable_ledger_run()->set_run_id("r");
  records[1].mutable_ledger_run()->set_next_seq(1);
  for (int64_t seq = 1; seq <= 3; ++seq) {
    lathe::v1::JournalAccepted* a = records[1 + seq].mutable_accepted();
    a->set_op_id("r/" + std::to_string(seq));
    a->set_run_id("r");
    a->set_seq_id(seq);
    a->set_request(Op(seq, /*optim=*/seq < 3).SerializeAsString());
  }
  std::vector<lathe::v1::JournalRun> runs;
  ASSERT_TRUE(ledger.Restore(records, &runs).ok());
  ASSERT_EQ(ledger.Recovered().size(), 3u);

  ReplicaRegistry registry{2, absl::Seconds(30)};
  FakeReplica a{&registry, 0}, b{&registry, 1};
  auto kept = [](lathe::v1::RegisterReplica r, std::vector<std::string> op_ids) {
    for (const std::string& id : op_ids) {
      lathe::v1::KeptAnswer* k = r.add_kept();
      k->set_op_id(id);
      k->mutable_answer()->mutable_result()->mutable_optim_step();
    }
    r.set_rejoin(true);
    return r;
  };
  ASSERT_TRUE(registry.Register(kept(Registration(0), {"r/1", "r/2"}), &a).ok());
  ASSERT_TRUE(registry.Register(kept(Registration(1), {"r/1"}), &b).ok());
  Dispatcher dispatcher{&ledger, &registry, absl::Seconds(30)};
  dispatcher.RestoreRun(runs[0]);
  EXPECT_EQ(dispatcher.Recover(), 2);

  const OpView one = *ledger.Lookup("r/1");
  EXPECT_EQ(one.state, lathe::v1::RetrieveResponse::DONE);
  EXPECT_TRUE(one.result.has_optim_step());
  EXPECT_EQ(dispatcher.Run("r")->step(), 1);  // the step it took counts
  const OpView two = *ledger.Lookup("r/2");
  ASSERT_EQ(two.state, lathe::v1::RetrieveResponse::FAILED);
  EXPECT_EQ(two.error.category(), lathe::v1::OpError::SERVER);
  EXPECT_NE(two.error.message().find("restarted"), std::string::npos) << two.error.message();
  EXPECT_EQ(ledger.Lookup("r/3")->state, lathe::v1::RetrieveResponse::PENDING);

  dispatcher.Start();
  a.Release();
  b.Release();
  EXPECT_EQ(ledger.Wait("r/3", absl::Seconds(10))->state, lathe::v1::RetrieveResponse::DONE);
  dispatcher.Stop();
  EXPECT_EQ(a.seen_seq_ids(), (std::vector<int64_t>{3}));  // nothing that ran before runs again
  EXPECT_EQ(b.seen_seq_ids(), (std::vector<int64_t>{3}));
}

}  // namespace
}  // namespace lathe::coordinator
