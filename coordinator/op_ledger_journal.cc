// The op ledger's journal side: writing and syncing records, rebuilding
// from them after a restart, settling recovered ops, and compaction.
#include <algorithm>
#include <tuple>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/op_ledger.h"
#include "coordinator/op_ledger_entries.h"
#include "core/log.h"

namespace lathe::coordinator {

using lathe::v1::JournalRecord;
using lathe::v1::JournalRun;
using lathe::v1::RetrieveResponse;

namespace {

lathe::v1::JournalRecord AcceptedRecord(const std::string& op_id, const std::string& run_id, int64_t seq_id,
                                        const std::string& request, bool unordered, absl::Time arrived) {
  lathe::v1::JournalRecord record;
  lathe::v1::JournalAccepted* a = record.mutable_accepted();
  a->set_op_id(op_id);
  a->set_run_id(run_id);
  a->set_seq_id(seq_id);
  a->set_request(request);
  a->set_unordered(unordered);
  a->set_arrived_unix_ms(absl::ToUnixMillis(arrived));
  return record;
}

lathe::v1::JournalRecord FinishedRecord(const OpView& view, absl::Time finished) {
  lathe::v1::JournalRecord record;
  lathe::v1::JournalFinished* f = record.mutable_finished();
  f->set_op_id(view.op_id);
  f->set_failed(view.state == RetrieveResponse::FAILED);
  if (f->failed()) *f->mutable_error() = view.error;
  else *f->mutable_result() = view.result;
  f->set_finished_unix_ms(absl::ToUnixMillis(finished));
  return record;
}

}  // namespace

absl::Status OpLedger::WriteAcceptedLocked(Op& op) {
  if (journal_ == nullptr) return absl::OkStatus();
  absl::StatusOr<int64_t> mark = journal_->Write(
      AcceptedRecord(op.view.op_id, op.run_id, op.seq_id, op.request_bytes, op.unordered, op.arrived));
  if (!mark.ok()) return absl::UnavailableError(absl::StrCat("cannot journal the operation: ", mark.status().message()));
  op.journal_mark = *mark;
  return absl::OkStatus();
}

void OpLedger::WriteFinishedLocked(const Op& op, const JournalRun* run_state) {
  if (journal_ == nullptr) return;
  lathe::v1::JournalRecord record = FinishedRecord(op.view, op.finished);
  if (run_state != nullptr) *record.mutable_finished()->mutable_run() = *run_state;
  // Not fatal: without the record a restart recovers the op from the
  // replicas' kept answers, or runs it.
  absl::StatusOr<int64_t> mark = journal_->Write(record);
  if (!mark.ok()) {
    LATHE_LOG(Error, "cannot journal the result of op %s: %s", op.view.op_id, mark.status().message());
    return;
  }
  finished_mark_ = std::max(finished_mark_, *mark);
  ++unsynced_finished_;
}

absl::StatusOr<std::string> OpLedger::Synced(absl::StatusOr<std::string> op_id) {
  if (!op_id.ok() || journal_ == nullptr) return op_id;
  int64_t mark = 0;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (auto it = ops_.find(*op_id); it != ops_.end()) mark = it->second->journal_mark;
  }
  if (absl::Status s = journal_->Sync(mark); !s.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot journal the operation: ", s.message()));
  }
  return op_id;
}

void OpLedger::SyncFinished(bool force) {
  if (journal_ == nullptr) return;
  int64_t mark = 0;
  {
    // Finished records are synced in groups: one lost to a machine crash
    // is recovered from the replicas' kept answers (a group is far smaller
    // than their window), and one sync per result would cap the ledger at
    // the disk's sync rate. A process crash loses none (they are written).
    absl::MutexLock lock(&mu_);
    if (unsynced_finished_ == 0 || (!force && unsynced_finished_ < kFinishedPerSync)) return;
    unsynced_finished_ = 0;
    mark = finished_mark_;
  }
  // Not fatal: without the records a restart recovers the ops from the
  // replicas' kept answers, or runs them.
  if (absl::Status s = journal_->Sync(mark); !s.ok()) LATHE_LOG(Error, "cannot sync the journal: %s", s.message());
}

absl::Status OpLedger::Restore(const std::vector<JournalRecord>& records, std::vector<JournalRun>* runs) {
  absl::MutexLock lock(&mu_);
  for (const JournalRecord& record : records) RestoreLocked(record);
  for (const auto& [run_id, run] : runs_) {
    if (!run->state.run_id().empty()) runs->push_back(run->state);
  }
  std::sort(runs->begin(), runs->end(),
            [](const JournalRun& a, const JournalRun& b) { return a.run_id() < b.run_id(); });
  return absl::OkStatus();
}

void OpLedger::RestoreLocked(const JournalRecord& record) {
  auto run_of = [this](const std::string& run_id) -> Run& {
    std::unique_ptr<Run>& run = runs_[run_id];
    if (run == nullptr) run = std::make_unique<Run>();
    return *run;
  };
  switch (record.kind_case()) {
    case JournalRecord::kRun: {
      Run& run = run_of(record.run().run_id());
      run.state = record.run();
      break;
    }
    case JournalRecord::kLedgerRun: {
      Run& run = run_of(record.ledger_run().run_id());
      run.next_seq = record.ledger_run().next_seq();
      if (record.ledger_run().deleted_at() > 0) run.deleted_at = record.ledger_run().deleted_at();
      break;
    }
    case JournalRecord::kAccepted: {
      const lathe::v1::JournalAccepted& a = record.accepted();
      if (ops_.count(a.op_id()) > 0) break;
      Run& run = run_of(a.run_id());
      auto op = std::make_unique<Op>();
      op->run_id = a.run_id();
      op->seq_id = a.seq_id();
      op->request_bytes = a.request();
      op->unordered = a.unordered();
      op->recovered = true;
      op->arrived = absl::FromUnixMillis(a.arrived_unix_ms());
      op->view.op_id = a.op_id();
      Op* added = op.get();
      ops_.emplace(a.op_id(), std::move(op));
      ++unfinished_;
      if (!a.unordered()) {
        lathe::v1::SubmitRequest request;
        if (request.ParseFromString(a.request()) && request.has_delete_run()) {
          run.deleted_at = std::min(run.deleted_at, a.seq_id());
        }
      }
      if (a.unordered() || a.seq_id() < run.next_seq) {
        // Released before the restart (or outside the order): ready again.
        added->phase = Op::Phase::kReady;
        ready_.push_back(added);
      } else {
        run.buffered.emplace(a.seq_id(), added);
        ReleaseLocked(run);
      }
      break;
    }
    case JournalRecord::kFinished: {
      const lathe::v1::JournalFinished& f = record.finished();
      auto it = ops_.find(f.op_id());
      if (it == ops_.end() || it->second->phase == Op::Phase::kFinished) break;
      Op& op = *it->second;
      Run& run = run_of(op.run_id);
      if (op.phase == Op::Phase::kBuffered) {
        // Failed while waiting (a gap timeout, FailAll): the run moved past it.
        run.buffered.erase(op.seq_id);
        run.next_seq = std::max(run.next_seq, op.seq_id + 1);
        ReleaseLocked(run);
      } else {
        ready_.erase(std::remove(ready_.begin(), ready_.end(), &op), ready_.end());
      }
      op.phase = Op::Phase::kFinished;
      op.view.state = f.failed() ? RetrieveResponse::FAILED : RetrieveResponse::DONE;
      if (f.failed()) op.view.error = f.error();
      else op.view.result = f.result();
      op.finished = absl::FromUnixMillis(f.finished_unix_ms());
      --unfinished_;
      finished_.push_back(&op);
      if (f.has_run()) SetRunStateLocked(op.run_id, f.run());
      break;
    }
    case JournalRecord::KIND_NOT_SET:
      break;
  }
}

std::vector<ReadyOp> OpLedger::Recovered() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<ReadyOp> out;
  for (const Op* op : ready_) {
    if (!op->recovered) continue;
    ReadyOp ready;
    ready.op_id = op->view.op_id;
    if (ready.request.ParseFromString(op->request_bytes)) out.push_back(std::move(ready));
  }
  return out;
}

void OpLedger::Settle(const std::string& op_id, const lathe::v1::OpResult* result, const lathe::v1::OpError& error,
                      const JournalRun* run_state) {
  {
    absl::MutexLock lock(&mu_);
    auto it = ops_.find(op_id);
    if (it == ops_.end()) return;
    Op& op = *it->second;
    if (op.phase != Op::Phase::kReady && op.phase != Op::Phase::kRunning) return;
    ready_.erase(std::remove(ready_.begin(), ready_.end(), &op), ready_.end());
    if (result != nullptr) {
      op.view.result = *result;
      FinishLocked(op, RetrieveResponse::DONE, run_state);
    } else {
      FailLocked(op, error);
    }
  }
  SyncFinished();
}

absl::Status OpLedger::Compact() {
  absl::MutexLock lock(&mu_);
  if (journal_ == nullptr) return absl::FailedPreconditionError("the ledger has no journal");
  return CompactLocked();
}

absl::Status OpLedger::CompactLocked() {
  std::vector<JournalRecord> records;
  for (const auto& [run_id, run] : runs_) {
    JournalRecord& position = records.emplace_back();
    position.mutable_ledger_run()->set_run_id(run_id);
    position.mutable_ledger_run()->set_next_seq(run->next_seq);
    if (run->deleted_at != std::numeric_limits<int64_t>::max()) {
      position.mutable_ledger_run()->set_deleted_at(run->deleted_at);
    }
    // A deleted run leaves only its id and position (its id is never reused).
    if (!run->state.run_id().empty() && !run->state.deleted()) *records.emplace_back().mutable_run() = run->state;
  }
  auto accepted = [&records](const Op& op) {
    records.push_back(AcceptedRecord(op.view.op_id, op.run_id, op.seq_id, op.request_bytes, op.unordered, op.arrived));
  };
  for (const Op* op : finished_) {
    accepted(*op);
    records.push_back(FinishedRecord(op->view, op->finished));
  }
  // Unfinished ones in the order they would run: on the replicas, ready,
  // then waiting for a gap.
  std::vector<const Op*> running;
  for (const auto& [op_id, op] : ops_) {
    if (op->phase == Op::Phase::kRunning) running.push_back(op.get());
  }
  std::sort(running.begin(), running.end(), [](const Op* a, const Op* b) {
    return std::tie(a->run_id, a->seq_id) < std::tie(b->run_id, b->seq_id);
  });
  for (const Op* op : running) accepted(*op);
  for (const Op* op : ready_) accepted(*op);
  for (const auto& [run_id, run] : runs_) {
    for (const auto& [seq_id, op] : run->buffered) accepted(*op);
  }
  return journal_->Rewrite(records);
}

}  // namespace lathe::coordinator
