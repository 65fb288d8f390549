// The coordinator's journal: records survive a reopen, a torn or corrupt tail
// is dropped, and a ledger rebuilt from it answers as the one that wrote it
// (results, retries, conflicts, order, recovered ops); compaction forgets
// expired results and deleted runs and keeps the rest.
#include "coordinator/journal.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "coordinator/op_ledger.h"
#include "tests/coordinator/fake_clock.h"

namespace lathe::coordinator {
namespace {

using lathe::v1::JournalRecord;
using lathe::v1::JournalRun;
using lathe::v1::OpResult;
using lathe::v1::RetrieveResponse;
using lathe::v1::SubmitRequest;

// A fresh folder, removed when the test program ends.
std::string TempDir() {
  static std::vector<std::string>* made = [] {
    auto* dirs = new std::vector<std::string>();
    std::atexit([] {
      for (const std::string& d : *made) std::filesystem::remove_all(d);
    });
    return dirs;
  }();
  std::string tmpl = (std::filesystem::temp_directory_path() / "journal_test.XXXXXX").string();
  EXPECT_NE(::mkdtemp(tmpl.data()), nullptr);
  made->push_back(tmpl);
  return tmpl;
}

JournalRecord RunRecord(const std::string& run_id) {
  JournalRecord record;
  record.mutable_run()->set_run_id(run_id);
  return record;
}

std::vector<JournalRecord> Reopen(const std::string& dir) {
  std::vector<JournalRecord> records;
  auto journal = Journal::Open(dir, &records);
  EXPECT_TRUE(journal.ok()) << journal.status();
  return records;
}

// A new journal in `dir` holding one run record per id; its file's path.
std::string WriteRuns(const std::string& dir, const std::vector<std::string>& ids) {
  std::vector<JournalRecord> none;
  auto journal = Journal::Open(dir, &none);
  EXPECT_TRUE(journal.ok()) << journal.status();
  if (!journal.ok()) return "";
  for (const std::string& id : ids) EXPECT_TRUE((*journal)->Append(RunRecord(id)).ok());
  return (*journal)->path();
}

SubmitRequest Save(const std::string& run_id, int64_t seq_id, const std::string& name) {
  SubmitRequest r;
  r.set_run_id(run_id);
  r.set_seq_id(seq_id);
  r.mutable_save_state()->set_name(name);
  return r;
}

OpResult SaveResult(const std::string& path) {
  OpResult result;
  result.mutable_save_state()->set_path(path);
  return result;
}

TEST(Journal, RecordsSurviveAReopen) {
  const std::string dir = TempDir();
  {
    std::vector<JournalRecord> none;
    auto journal = Journal::Open(dir, &none);
    ASSERT_TRUE(journal.ok()) << journal.status();
    EXPECT_TRUE(none.empty());
    for (const char* id : {"a", "b", "c"}) ASSERT_TRUE((*journal)->Append(RunRecord(id)).ok());
  }
  std::vector<JournalRecord> records = Reopen(dir);
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[2].run().run_id(), "c");
}

TEST(Journal, ATornTailIsDroppedAndAppendsContinueAfterIt) {
  const std::string dir = TempDir();
  const std::string path = WriteRuns(dir, {"a", "b", "c"});
  ASSERT_FALSE(path.empty());
  // kill -9 in the middle of the last write: its frame is cut short.
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(std::filesystem::file_size(path) - 2)), 0);
  {
    std::vector<JournalRecord> records;
    auto journal = Journal::Open(dir, &records);
    ASSERT_TRUE(journal.ok());
    ASSERT_EQ(records.size(), 2u);
    EXPECT_EQ(records[1].run().run_id(), "b");
    ASSERT_TRUE((*journal)->Append(RunRecord("d")).ok());
  }
  std::vector<JournalRecord> records = Reopen(dir);
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[2].run().run_id(), "d");
}

TEST(Journal, ARecordWhoseChecksumFailsEndsTheLog) {
  const std::string dir = TempDir();
  const std::string path = WriteRuns(dir, {"a", "bbbb", "c"});
  ASSERT_FALSE(path.empty());
  // Flip the last byte of the second record's payload ("bbbb").
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t at = data.find("bbbb") + 3;
  f.seekp(static_cast<std::streamoff>(at));
  f.put('x');
  f.close();
  std::vector<JournalRecord> records = Reopen(dir);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].run().run_id(), "a");
}

TEST(Journal, ALedgerRebuiltFromItAnswersAsBefore) {
  const std::string dir = TempDir();
  FakeClock clock;
  std::string done_id, running_id, waiting_id;
  {
    std::vector<JournalRecord> none;
    auto journal = Journal::Open(dir, &none);
    ASSERT_TRUE(journal.ok());
    OpLedger ledger(LedgerOptions{}, &clock, journal->get());
    JournalRun state;
    state.mutable_info()->set_step(0);
    ASSERT_TRUE(ledger.OpenRun("r", 1, state).ok());
    done_id = *ledger.Submit(Save("r", 1, "one"));
    running_id = *ledger.Submit(Save("r", 2, "two"));
    waiting_id = *ledger.Submit(Save("r", 4, "four"));  // seq_id 3 is missing
    ASSERT_EQ(ledger.TakeReady()->op_id, done_id);
    JournalRun after;
    after.mutable_info()->set_step(7);
    ledger.Complete(done_id, SaveResult("p1"), &after);
    ASSERT_EQ(ledger.TakeReady()->op_id, running_id);  // on the replicas when the coordinator dies
  }
  std::vector<JournalRecord> records = Reopen(dir);
  OpLedger ledger(LedgerOptions{}, &clock);
  std::vector<JournalRun> runs;
  ASSERT_TRUE(ledger.Restore(records, &runs).ok());
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].info().step(), 7);
  absl::StatusOr<OpView> done = ledger.Lookup(done_id);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state, RetrieveResponse::DONE);
  EXPECT_EQ(done->result.save_state().path(), "p1");
  // Retries answer the same ids; a conflicting payload is refused.
  EXPECT_EQ(*ledger.Submit(Save("r", 1, "one")), done_id);
  EXPECT_EQ(*ledger.Submit(Save("r", 2, "two")), running_id);
  EXPECT_EQ(ledger.Submit(Save("r", 2, "other")).status().code(), absl::StatusCode::kAlreadyExists);
  // The op that was out is recovered, not forgotten; the one behind the gap still waits.
  std::vector<ReadyOp> recovered = ledger.Recovered();
  ASSERT_EQ(recovered.size(), 1u);
  EXPECT_EQ(recovered[0].op_id, running_id);
  EXPECT_EQ(ledger.Lookup(waiting_id)->state, RetrieveResponse::PENDING);
  ledger.Settle(running_id, nullptr, lathe::v1::OpError());
  EXPECT_EQ(ledger.Lookup(running_id)->state, RetrieveResponse::FAILED);
  // The next seq_id continues and releases the waiting one behind it.
  ASSERT_TRUE(ledger.Submit(Save("r", 3, "three")).ok());
  EXPECT_EQ(ledger.TakeReady()->request.seq_id(), 3);
  EXPECT_EQ(ledger.TakeReady()->request.seq_id(), 4);
  EXPECT_EQ(ledger.Submit(Save("r", 1, "late")).status().code(), absl::StatusCode::kAlreadyExists);
}

TEST(Journal, CompactionForgetsExpiredResultsAndDeletedRunsAndKeepsTheRest) {
  const std::string dir = TempDir();
  FakeClock clock;
  LedgerOptions options;
  options.result_ttl = absl::Seconds(10);
  options.compact_min_bytes = 1;
  int64_t before = 0;
  {
    std::vector<JournalRecord> none;
    auto journal = Journal::Open(dir, &none);
    ASSERT_TRUE(journal.ok());
    OpLedger ledger(options, &clock, journal->get());
    ASSERT_TRUE(ledger.OpenRun("keep", 1).ok());
    ASSERT_TRUE(ledger.OpenRun("gone", 1).ok());
    for (int i = 1; i <= 50; ++i) {
      ASSERT_TRUE(ledger.Submit(Save("keep", i, std::string(200, 'x'))).ok());
      ledger.Complete(ledger.TakeReady()->op_id, SaveResult("p"));
    }
    SubmitRequest del;
    del.set_run_id("gone");
    del.set_seq_id(1);
    del.mutable_delete_run();
    ASSERT_TRUE(ledger.Submit(del).ok());
    JournalRun deleted;
    deleted.set_deleted(true);
    ledger.Complete(ledger.TakeReady()->op_id, OpResult(), &deleted);
    clock.Advance(absl::Seconds(11));
    ASSERT_TRUE(ledger.Submit(Save("keep", 51, "recent")).ok());
    ledger.Complete(ledger.TakeReady()->op_id, SaveResult("p51"));
    before = (*journal)->bytes();
    ledger.Sweep();  // forgets the 51 expired results and compacts
    EXPECT_LT((*journal)->bytes(), before / 10);
  }
  std::vector<JournalRecord> records = Reopen(dir);
  for (const JournalRecord& r : records) {
    EXPECT_FALSE(r.has_run() && r.run().run_id() == "gone") << "a deleted run's state outlived compaction";
  }
  OpLedger ledger(options, &clock);
  std::vector<JournalRun> runs;
  ASSERT_TRUE(ledger.Restore(records, &runs).ok());
  EXPECT_EQ(ledger.Lookup("keep/1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ledger.Lookup("keep/51")->result.save_state().path(), "p51");
  EXPECT_EQ(ledger.Submit(Save("keep", 50, "again")).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(*ledger.Submit(Save("keep", 52, "next")), "keep/52");
  EXPECT_EQ(ledger.Submit(Save("gone", 2, "x")).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(ledger.HasRun("gone"));  // its id is never reused
}

}  // namespace
}  // namespace lathe::coordinator
