// The op ledger: every operation the coordinator accepted, per run, from
// submit to expiry. It orders each run's operations by seq_id (buffering
// gaps), recognises retries, bounds the queue, keeps results for a TTL and
// fails what cannot complete. No network, no threads of its own; time comes
// from a Clock so tests can drive it.
//
// Thread-safe: every method may be called from any thread.
#ifndef LATHE_COORDINATOR_OP_LEDGER_H_
#define LATHE_COORDINATOR_OP_LEDGER_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/journal.h"
#include "lathe/v1/journal.pb.h"
#include "lathe/v1/service.pb.h"

namespace lathe::coordinator {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// absl::Now().
const Clock& RealClock();

struct LedgerOptions {
  // How long an operation may wait for a missing earlier seq_id of its run
  // before it (and every later buffered one) fails.
  absl::Duration gap_timeout = absl::Minutes(10);
  // How long a finished operation's result stays retrievable.
  absl::Duration result_ttl = absl::Hours(1);
  // Operations accepted but not finished, over all runs; past it Submit
  // answers ResourceExhausted. Also the seq_id window: a seq_id at or past
  // the run's next expected one + max_unfinished could only run after more
  // operations than may be unfinished at once, so Submit refuses it.
  int64_t max_unfinished = 1024;
  // With a journal: Sweep compacts it once it holds this many bytes more than
  // twice its size after the last compaction.
  int64_t compact_min_bytes = int64_t{1} << 20;
};

// A finished or unfinished operation as Retrieve reports it.
struct OpView {
  std::string op_id;
  lathe::v1::RetrieveResponse::State state = lathe::v1::RetrieveResponse::PENDING;
  lathe::v1::OpResult result;  // DONE
  lathe::v1::OpError error;    // FAILED
};

// An operation ready to be dispatched, in its run's seq_id order.
struct ReadyOp {
  std::string op_id;
  lathe::v1::SubmitRequest request;
};

// With a journal (not owned; null: none) every state change is recorded
// there before it is visible: a run opened, an op accepted (before its op id
// is answered), an op finished (with the run's state after it). Restore
// rebuilds the ledger from those records after a restart.
class OpLedger {
 public:
  explicit OpLedger(LedgerOptions options, const Clock* clock = &RealClock(), Journal* journal = nullptr);
  ~OpLedger();
  OpLedger(const OpLedger&) = delete;
  OpLedger& operator=(const OpLedger&) = delete;

  // Opens a run whose next expected seq_id is `first_seq`. AlreadyExists when
  // the run is open.
  // `state` (the run's registry entry) is journaled with it.
  absl::Status OpenRun(const std::string& run_id, int64_t first_seq,
                       const lathe::v1::JournalRun& state = lathe::v1::JournalRun());
  bool HasRun(const std::string& run_id) const;

  // Accepts an already validated operation and returns its op id,
  // "<run_id>/<seq_id>". The same (run_id, seq_id) with a byte-identical
  // request returns the original op id (whatever its state, until it
  // expires); with another request AlreadyExists. NotFound for an unknown
  // run; FailedPrecondition for a seq_id below the run's next expected one
  // that the ledger never saw (or that expired), for seq_id < 1 or
  // INT64_MAX, or for a seq_id max_unfinished or more past the run's next
  // expected one (the message names the window); ResourceExhausted past
  // max_unfinished;
  // Unavailable after Close().
  absl::StatusOr<std::string> Submit(const lathe::v1::SubmitRequest& request);

  // Accepts an already validated sampling operation (sample /
  // compute_logprobs pinned to published weights) outside the run's seq_id
  // order: it is ready at once and takes no seq_id of the run, so a client
  // that samples while another client of the same run trains (Tinker's
  // sampling and training clients) cannot collide with it. Its op id is
  // "<run_id>/<lane>.<seq_id>"; `lane` names the sender's own sequence (a
  // sampling session) and must be 1-64 characters of [A-Za-z0-9_-].
  // Retries, the TTL and the unfinished bound are as for Submit; NotFound
  // for an unknown or deleted run; Unavailable after Close().
  absl::StatusOr<std::string> SubmitUnordered(const lathe::v1::SubmitRequest& request, const std::string& lane);

  // Inserts an operation of the coordinator's own making (a run's
  // initialisation) at the run's next expected seq_id, as if submitted.
  absl::StatusOr<std::string> SubmitInternal(lathe::v1::SubmitRequest request);

  // Takes the next operation whose seq_id is its run's next one, marks it
  // running and advances the run; nullopt when none is ready. Runs are served
  // in the order their operations became ready.
  std::optional<ReadyOp> TakeReady();
  // As TakeReady, but waits up to `timeout` for one.
  std::optional<ReadyOp> WaitReady(absl::Duration timeout);

  // Finishes a running operation. Ignored for an op that already finished
  // (a late answer after FailAll).
  // `run_state`: the run's registry entry after the op (its info, published
  // versions, deleted), journaled with the result; null when unchanged.
  void Complete(const std::string& op_id, lathe::v1::OpResult result,
                const lathe::v1::JournalRun* run_state = nullptr);
  void Fail(const std::string& op_id, lathe::v1::OpError error);

  // Rebuilds the ledger from a journal's records (REQUIRES: a fresh ledger,
  // before any other call). Finished ops keep their results and finish times
  // (so the TTL runs on); accepted ops that did not finish become ready again
  // in their run's order, marked recovered (see Recovered). *runs gets each
  // run's latest registry entry (deleted ones too). InvalidArgument when the
  // records contradict each other (an op finished twice is ignored).
  absl::Status Restore(const std::vector<lathe::v1::JournalRecord>& records,
                       std::vector<lathe::v1::JournalRun>* runs);
  // The restored ops that are still unfinished and not yet taken, in the
  // order they will be taken.
  std::vector<ReadyOp> Recovered() const;
  // Finishes an op that is ready or running (a recovered one whose outcome
  // became known) with its result, or its error when `result` is null.
  void Settle(const std::string& op_id, const lathe::v1::OpResult* result, const lathe::v1::OpError& error,
              const lathe::v1::JournalRun* run_state = nullptr);
  // Rewrites the journal to what the ledger holds now (runs, unexpired ops).
  absl::Status Compact();

  // Fails every unfinished operation (buffered, ready and running) with the
  // given error; later Submits still work unless Close() was called.
  void FailAll(const lathe::v1::OpError& error);
  // Refuses further Submits with Unavailable (shutdown).
  void Close();

  // The op's current view. NotFound for an unknown or expired op id.
  absl::StatusOr<OpView> Lookup(const std::string& op_id) const;
  // As Lookup, waiting up to `timeout` (real time) for the op to finish.
  absl::StatusOr<OpView> Wait(const std::string& op_id, absl::Duration timeout) const;

  // Housekeeping by the clock: fails buffered ops that waited longer than
  // gap_timeout for a missing seq_id (error USER, DEADLINE_EXCEEDED, naming
  // the missing seq_id) and moves their run's next expected seq_id past them;
  // forgets finished ops older than result_ttl. Call it periodically.
  void Sweep();

  int64_t unfinished() const;

 private:
  struct Op;
  struct Run;

  // The submits without the journal's sync; Synced syncs the op's record
  // (outside the lock) and answers its id.
  absl::StatusOr<std::string> SubmitNoSync(const lathe::v1::SubmitRequest& request);
  absl::StatusOr<std::string> SubmitUnorderedNoSync(const lathe::v1::SubmitRequest& request, const std::string& lane);
  absl::StatusOr<std::string> SubmitInternalNoSync(lathe::v1::SubmitRequest request);
  absl::StatusOr<std::string> Synced(absl::StatusOr<std::string> op_id);
  // Syncs the finished records written so far (outside the lock), once
  // kFinishedPerSync of them wait, or any with `force` (Sweep, FailAll).
  void SyncFinished(bool force = false);
  static constexpr int kFinishedPerSync = 32;
  // Submit and SubmitInternal once the request is serialized to `bytes`.
  absl::StatusOr<std::string> SubmitLocked(const std::string& run_id, int64_t seq_id,
                                           std::string bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What both submits check first: the ledger is open and the run exists
  // (*run is set then); an op already under op_id answers its id when the
  // request bytes are the same (a retry), ALREADY_EXISTS when not. nullopt:
  // the op is new.
  std::optional<absl::StatusOr<std::string>> CheckSubmitLocked(const std::string& run_id, const std::string& op_id,
                                                               const std::string& bytes, Run** run)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records a new op (buffered) and counts it unfinished; RESOURCE_EXHAUSTED
  // when the ledger holds its most unfinished ops.
  absl::StatusOr<Op*> AddOpLocked(const std::string& run_id, int64_t seq_id, std::string op_id, std::string bytes,
                                  bool unordered) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves the run's buffered ops that directly follow its released ones to
  // the ready queue, advancing its next expected seq_id.
  void ReleaseLocked(Run& run) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<ReadyOp> TakeReadyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Finishes an unfinished op as DONE or FAILED, its result or error already
  // set in its view.
  void FinishLocked(Op& op, lathe::v1::RetrieveResponse::State state,
                    const lathe::v1::JournalRun* run_state = nullptr) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Journal records of an op accepted (its mark kept for Synced) and
  // finished (its mark counted for SyncFinished).
  absl::Status WriteAcceptedLocked(Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WriteFinishedLocked(const Op& op, const lathe::v1::JournalRun* run_state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Keeps a run's registry entry (the client's create request stays).
  void SetRunStateLocked(const std::string& run_id, const lathe::v1::JournalRun& state)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RestoreLocked(const lathe::v1::JournalRecord& record) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CompactLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailLocked(Op& op, const lathe::v1::OpError& error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // An op that is running, or null.
  Op* FindRunningLocked(const std::string& op_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailTimedOutGapsLocked(Run& run, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetExpiredLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<OpView> ViewLocked(const std::string& op_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const LedgerOptions options_;
  const Clock* const clock_;
  Journal* const journal_;
  mutable absl::Mutex mu_;
  mutable absl::CondVar finished_cv_;  // signalled when an op finishes
  absl::CondVar ready_cv_;             // signalled when ready_ grows
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int64_t unfinished_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t finished_mark_ ABSL_GUARDED_BY(mu_) = 0;  // of the last finished record written
  int unsynced_finished_ ABSL_GUARDED_BY(mu_) = 0;
  std::unordered_map<std::string, std::unique_ptr<Run>> runs_ ABSL_GUARDED_BY(mu_);
  // Every op not yet forgotten, by op id; owns them.
  std::unordered_map<std::string, std::unique_ptr<Op>> ops_ ABSL_GUARDED_BY(mu_);
  // Released ops not yet taken, in the order they became ready.
  std::deque<Op*> ready_ ABSL_GUARDED_BY(mu_);
  // Finished ops in the order they finished, for the TTL.
  std::deque<Op*> finished_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_OP_LEDGER_H_
