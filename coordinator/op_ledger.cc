// The op ledger's bookkeeping: per-run seq_id ordering with gap buffering, a
// global ready queue, retry identity by deterministic serialization, expiry.
#include "coordinator/op_ledger.h"
#include "coordinator/op_ledger_entries.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "core/log.h"
#include "core/quote.h"

namespace lathe::coordinator {
namespace {

using lathe::v1::OpError;
using runtime::QuoteForMessage;
using lathe::v1::OpResult;
using lathe::v1::RetrieveResponse;
using lathe::v1::SubmitRequest;

class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};

std::string OpId(const std::string& run_id, int64_t seq_id) {
  return absl::StrCat(run_id, "/", seq_id);
}

// Map fields (ForwardBackwardInput::loss_fn_config, Datum::loss_fn_inputs)
// serialize in hash order unless asked not to, so equal requests could differ
// byte for byte; deterministic serialization sorts map entries by key.
std::string DeterministicBytes(const SubmitRequest& request) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream stream(&bytes);
    google::protobuf::io::CodedOutputStream out(&stream);
    out.SetSerializationDeterministic(true);
    request.SerializePartialToCodedStream(&out);
  }  // `out` flushes into `bytes` when it goes
  return bytes;
}

OpError MakeError(OpError::Category category, absl::StatusCode code, std::string message) {
  OpError error;
  error.set_category(category);
  error.set_code(static_cast<int32_t>(code));
  error.set_message(std::move(message));
  return error;
}

}  // namespace

const Clock& RealClock() {
  static const Clock* const clock = new SystemClock();
  return *clock;
}

OpLedger::OpLedger(LedgerOptions options, const Clock* clock, Journal* journal)
    : options_(std::move(options)), clock_(clock), journal_(journal) {}

OpLedger::~OpLedger() = default;

absl::Status OpLedger::OpenRun(const std::string& run_id, int64_t first_seq, const lathe::v1::JournalRun& state) {
  absl::MutexLock lock(&mu_);
  if (runs_.count(run_id) > 0) {
    return absl::AlreadyExistsError(absl::StrCat("run ", QuoteForMessage(run_id), " is already open"));
  }
  auto run = std::make_unique<Run>();
  run->next_seq = first_seq;
  run->state = state;
  run->state.set_run_id(run_id);
  if (journal_ != nullptr) {
    lathe::v1::JournalRecord record;
    *record.mutable_run() = run->state;  // replayed as a run whose next seq_id is 0
    if (absl::Status s = journal_->Append(record); !s.ok()) {
      return absl::UnavailableError(absl::StrCat("cannot journal the run: ", s.message()));
    }
  }
  runs_.emplace(run_id, std::move(run));
  return absl::OkStatus();
}

bool OpLedger::HasRun(const std::string& run_id) const {
  absl::ReaderMutexLock lock(&mu_);
  return runs_.count(run_id) > 0;
}

// The journal's sync runs outside the ledger's lock, so concurrent submits
// share one (group commit); the op id is answered only once it is durable.
absl::StatusOr<std::string> OpLedger::Submit(const SubmitRequest& request) {
  return Synced(SubmitNoSync(request));
}

absl::StatusOr<std::string> OpLedger::SubmitUnordered(const SubmitRequest& request, const std::string& lane) {
  return Synced(SubmitUnorderedNoSync(request, lane));
}

absl::StatusOr<std::string> OpLedger::SubmitInternal(SubmitRequest request) {
  return Synced(SubmitInternalNoSync(std::move(request)));
}

absl::StatusOr<std::string> OpLedger::SubmitNoSync(const SubmitRequest& request) {
  if (request.seq_id() < 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("seq_id must be at least 1, got ", request.seq_id()));
  }
  std::string bytes = DeterministicBytes(request);  // outside the lock: requests can be large
  absl::MutexLock lock(&mu_);
  if (!request.has_delete_run()) return SubmitLocked(request.run_id(), request.seq_id(), std::move(bytes));
  // A run's delete_run is its last operation: none may wait behind it, and
  // from its acceptance on (under this same lock) no later one is taken.
  auto run = runs_.find(request.run_id());
  if (run != runs_.end() && run->second->buffered.upper_bound(request.seq_id()) != run->second->buffered.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "delete_run at seq_id ", request.seq_id(), " must be the run's last operation; seq_id ",
        run->second->buffered.rbegin()->first, " was accepted after it"));
  }
  absl::StatusOr<std::string> op_id = SubmitLocked(request.run_id(), request.seq_id(), std::move(bytes));
  if (op_id.ok()) run->second->deleted_at = std::min(run->second->deleted_at, request.seq_id());
  return op_id;
}

absl::StatusOr<std::string> OpLedger::SubmitUnorderedNoSync(const SubmitRequest& request, const std::string& lane) {
  if (lane.empty() || lane.size() > 64 ||
      !std::all_of(lane.begin(), lane.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) ||
                                                                   c == '_' || c == '-'; })) {
    return absl::InvalidArgumentError(absl::StrCat("lane must be 1-64 characters of [A-Za-z0-9_-], not ",
                                                   QuoteForMessage(lane)));
  }
  if (request.seq_id() < 1) return absl::InvalidArgumentError("seq_id must be at least 1");
  std::string bytes = DeterministicBytes(request);
  std::string op_id = absl::StrCat(request.run_id(), "/", lane, ".", request.seq_id());
  absl::MutexLock lock(&mu_);
  Run* run = nullptr;
  if (auto known = CheckSubmitLocked(request.run_id(), op_id, bytes, &run)) return *std::move(known);
  if (run->deleted_at != std::numeric_limits<int64_t>::max()) {
    return absl::NotFoundError(absl::StrCat("run ", QuoteForMessage(request.run_id()), " is deleted"));
  }
  absl::StatusOr<Op*> op = AddOpLocked(request.run_id(), request.seq_id(), op_id, std::move(bytes), true);
  if (!op.ok()) return op.status();
  (*op)->phase = Op::Phase::kReady;
  ready_.push_back(*op);
  ready_cv_.SignalAll();
  return op_id;
}

absl::StatusOr<std::string> OpLedger::SubmitInternalNoSync(SubmitRequest request) {
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(request.run_id());
  if (it != runs_.end()) request.set_seq_id(it->second->next_seq);
  return SubmitLocked(request.run_id(), request.seq_id(), DeterministicBytes(request));
}

std::optional<absl::StatusOr<std::string>> OpLedger::CheckSubmitLocked(const std::string& run_id,
                                                                      const std::string& op_id,
                                                                      const std::string& bytes, Run** run) {
  if (closed_) return absl::UnavailableError("the coordinator is shutting down");
  auto run_it = runs_.find(run_id);
  if (run_it == runs_.end()) return absl::NotFoundError(absl::StrCat("unknown run ", QuoteForMessage(run_id)));
  *run = run_it->second.get();
  if (auto it = ops_.find(op_id); it != ops_.end()) {
    if (it->second->request_bytes != bytes) {
      return absl::AlreadyExistsError(
          absl::StrCat("op ", QuoteForMessage(op_id), " was submitted before with another request"));
    }
    return op_id;  // a retry
  }
  return std::nullopt;
}

absl::StatusOr<OpLedger::Op*> OpLedger::AddOpLocked(const std::string& run_id, int64_t seq_id, std::string op_id,
                                                    std::string bytes, bool unordered) {
  if (unfinished_ >= options_.max_unfinished) {
    return absl::ResourceExhaustedError(absl::StrCat(unfinished_, " operations are unfinished; retry later"));
  }
  auto op = std::make_unique<Op>();
  op->run_id = run_id;
  op->seq_id = seq_id;
  op->request_bytes = std::move(bytes);
  op->unordered = unordered;
  op->arrived = clock_->Now();
  op->view.op_id = op_id;
  // Durable before the op id is answered (Synced): a client that got it can
  // retrieve it after any crash.
  if (absl::Status s = WriteAcceptedLocked(*op); !s.ok()) return s;
  Op* added = op.get();
  ops_.emplace(std::move(op_id), std::move(op));
  ++unfinished_;
  return added;
}

absl::StatusOr<std::string> OpLedger::SubmitLocked(const std::string& run_id, int64_t seq_id,
                                                   std::string bytes) {
  std::string op_id = OpId(run_id, seq_id);
  Run* run_ptr = nullptr;
  if (auto known = CheckSubmitLocked(run_id, op_id, bytes, &run_ptr)) return *std::move(known);
  Run& run = *run_ptr;
  if (seq_id > run.deleted_at) {
    return absl::NotFoundError(absl::StrCat("run ", QuoteForMessage(run_id), " is deleted (delete_run at seq_id ",
                                            run.deleted_at, ")"));
  }
  if (seq_id < run.next_seq) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "seq_id %d of run %s is below the run's next expected seq_id %d and unknown (it timed "
        "out, expired or was never submitted)",
        seq_id, run_id, run.next_seq));
  }
  // The run is open, so run_id is one the coordinator made (bounded) from
  // here on. Both seq_ids are non-negative: the difference cannot overflow.
  if (seq_id - run.next_seq >= options_.max_unfinished) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "seq_id %d of run %s is too far ahead: the run expects seq_id %d next and accepts seq_ids "
        "below %d + %d (the window is --max_queued)",
        seq_id, run_id, run.next_seq, run.next_seq, options_.max_unfinished));
  }
  // The largest seq_id stays one below INT64_MAX, so the run's next expected
  // seq_id (at most one past an accepted one) always fits.
  if (seq_id == std::numeric_limits<int64_t>::max()) {
    return absl::FailedPreconditionError(absl::StrCat("seq_id must be below ", seq_id));
  }
  absl::StatusOr<Op*> op = AddOpLocked(run_id, seq_id, op_id, std::move(bytes), false);
  if (!op.ok()) return op.status();
  run.buffered.emplace(seq_id, *op);
  ReleaseLocked(run);
  return op_id;
}

void OpLedger::ReleaseLocked(Run& run) {
  bool released = false;
  for (auto it = run.buffered.begin(); it != run.buffered.end() && it->first == run.next_seq;
       it = run.buffered.erase(it)) {
    it->second->phase = Op::Phase::kReady;
    ready_.push_back(it->second);
    ++run.next_seq;
    released = true;
  }
  if (released) ready_cv_.SignalAll();
}

std::optional<ReadyOp> OpLedger::TakeReady() {
  absl::MutexLock lock(&mu_);
  return TakeReadyLocked();
}

std::optional<ReadyOp> OpLedger::WaitReady(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  bool timed_out = false;
  while (ready_.empty() && !timed_out) timed_out = ready_cv_.WaitWithDeadline(&mu_, deadline);
  return TakeReadyLocked();
}

std::optional<ReadyOp> OpLedger::TakeReadyLocked() {
  while (!ready_.empty()) {
    Op& op = *ready_.front();
    ready_.pop_front();
    ReadyOp ready;
    ready.op_id = op.view.op_id;
    if (!ready.request.ParseFromString(op.request_bytes)) {
      // Bytes this ledger wrote itself; failing the op beats handing out garbage.
      FailLocked(op, MakeError(OpError::SERVER, absl::StatusCode::kInternal,
                               absl::StrCat("the stored request of op ", op.view.op_id,
                                            " does not parse")));
      continue;
    }
    op.phase = Op::Phase::kRunning;
    return ready;
  }
  return std::nullopt;
}

OpLedger::Op* OpLedger::FindRunningLocked(const std::string& op_id) {
  auto it = ops_.find(op_id);
  if (it == ops_.end() || it->second->phase != Op::Phase::kRunning) return nullptr;
  return it->second.get();
}

void OpLedger::Complete(const std::string& op_id, OpResult result, const lathe::v1::JournalRun* run_state) {
  {
    absl::MutexLock lock(&mu_);
    Op* op = FindRunningLocked(op_id);
    if (op == nullptr) return;  // finished already (FailAll) or never dispatched
    op->view.result = std::move(result);
    FinishLocked(*op, RetrieveResponse::DONE, run_state);
  }
  SyncFinished();
}

void OpLedger::Fail(const std::string& op_id, OpError error) {
  {
    absl::MutexLock lock(&mu_);
    Op* op = FindRunningLocked(op_id);
    if (op != nullptr) FailLocked(*op, error);
  }
  SyncFinished();
}

void OpLedger::FailLocked(Op& op, const OpError& error) {
  op.view.error = error;
  FinishLocked(op, RetrieveResponse::FAILED);
}

void OpLedger::SetRunStateLocked(const std::string& run_id, const lathe::v1::JournalRun& state) {
  auto it = runs_.find(run_id);
  if (it == runs_.end()) return;
  lathe::v1::JournalRun merged = state;
  merged.set_run_id(run_id);
  merged.set_chosen(it->second->state.chosen());
  *merged.mutable_create_request() = it->second->state.create_request();
  it->second->state = std::move(merged);
}

void OpLedger::FinishLocked(Op& op, RetrieveResponse::State state, const lathe::v1::JournalRun* run_state) {
  op.phase = Op::Phase::kFinished;
  op.view.state = state;
  op.finished = clock_->Now();
  if (run_state != nullptr) SetRunStateLocked(op.run_id, *run_state);
  WriteFinishedLocked(op, run_state);
  --unfinished_;
  finished_.push_back(&op);
  finished_cv_.SignalAll();
}

void OpLedger::FailAll(const OpError& error) {
  {
    absl::MutexLock lock(&mu_);
    // Buffered ops fail too, so the run continues after the highest of them.
    for (auto& [run_id, run] : runs_) {
      if (!run->buffered.empty()) run->next_seq = run->buffered.rbegin()->first + 1;
      run->buffered.clear();
    }
    ready_.clear();
    for (auto& [op_id, op] : ops_) {
      if (op->phase != Op::Phase::kFinished) FailLocked(*op, error);
    }
  }
  SyncFinished(/*force=*/true);
}

void OpLedger::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

absl::StatusOr<OpView> OpLedger::Lookup(const std::string& op_id) const {
  absl::ReaderMutexLock lock(&mu_);
  return ViewLocked(op_id);
}

absl::StatusOr<OpView> OpLedger::Wait(const std::string& op_id, absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  bool timed_out = false;
  for (;;) {
    // Looked up again after every wake-up: the op may have expired meanwhile.
    absl::StatusOr<OpView> view = ViewLocked(op_id);
    if (!view.ok() || view->state != RetrieveResponse::PENDING || timed_out) return view;
    timed_out = finished_cv_.WaitWithDeadline(&mu_, deadline);
  }
}

absl::StatusOr<OpView> OpLedger::ViewLocked(const std::string& op_id) const {
  auto it = ops_.find(op_id);
  if (it == ops_.end()) return absl::NotFoundError(absl::StrCat("unknown or expired op ", QuoteForMessage(op_id)));
  return it->second->view;
}

void OpLedger::Sweep() {
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    for (auto& [run_id, run] : runs_) FailTimedOutGapsLocked(*run, now);
    ForgetExpiredLocked(now);
    if (journal_ != nullptr &&
        journal_->bytes() > 2 * journal_->bytes_at_rewrite() + options_.compact_min_bytes) {
      const int64_t before = journal_->bytes();
      if (absl::Status s = CompactLocked(); !s.ok()) {
        LATHE_LOG(Error, "cannot compact the journal: %s", s.message());
      } else {
        LATHE_LOG(Info, "compacted the journal from %d to %d bytes", before, journal_->bytes());
      }
    }
  }
  SyncFinished(/*force=*/true);
}

void OpLedger::FailTimedOutGapsLocked(Run& run, absl::Time now) {
  std::optional<int64_t> last_timed_out;
  for (const auto& [seq_id, op] : run.buffered) {
    if (now - op->arrived > options_.gap_timeout) last_timed_out = seq_id;
  }
  if (!last_timed_out) return;
  // Every op up to the last timed-out one waits on the same first gap.
  const OpError error = MakeError(
      OpError::USER, absl::StatusCode::kDeadlineExceeded,
      absl::StrFormat("seq_id %d of run %s did not arrive within %s", run.next_seq,
                      run.buffered.begin()->second->run_id,
                      absl::FormatDuration(options_.gap_timeout)));
  for (auto it = run.buffered.begin(); it != run.buffered.end() && it->first <= *last_timed_out;
       it = run.buffered.erase(it)) {
    FailLocked(*it->second, error);
  }
  run.next_seq = *last_timed_out + 1;
  ReleaseLocked(run);
}

void OpLedger::ForgetExpiredLocked(absl::Time now) {
  // finished_ is in finish order, so the expired ones are at its front.
  while (!finished_.empty() && now - finished_.front()->finished > options_.result_ttl) {
    const std::string op_id = finished_.front()->view.op_id;
    finished_.pop_front();
    ops_.erase(op_id);
  }
}

int64_t OpLedger::unfinished() const {
  absl::ReaderMutexLock lock(&mu_);
  return unfinished_;
}

}  // namespace lathe::coordinator
