// The coordinator's executor: takes each ready operation from the ledger in
// order, fans it out to the replicas, merges their answers and records the
// outcome; keeps each run's RunInfo up to date (step, LoRA config).
//
// Pipelined: up to `depth` operations are on the replicas at once (each
// replica executes its tasks in the order sent), so a replica starts the next
// operation without waiting for the coordinator to see the last one's answer;
// up to `sampling_depth` when the ones beyond `depth` are sampling requests
// (sample, compute_logprobs), so that concurrent requests reach a replica
// together and decode in one batch. Results are recorded in dispatch order,
// except that a sampling request completes as soon as its answer is in (a
// short request that joined a long decode need not wait for it).
//
// A sampling request that names no weights samples the newest version its
// run published before it: the dispatcher holds it until the run's earlier
// save_weights_for_sampler operations are recorded, then sends it with that
// version's path (none published since the run's last init: its current
// weights).
//
// Recovery: a coordinator restarted from its journal holds ops that were
// accepted but did not finish; some may have run on the replicas before the
// crash. Each replica leader keeps the answers of its last 128 tasks (tagged
// with their op ids) and reports them when it registers again. Recover()
// settles every such op from them before the first dispatch: answered by
// every replica it was meant for: its result (merged as usual, the run's
// state updated); answered by none: it never ran, and is dispatched again
// in its place in the run's order; answered by some only: failed (SERVER,
// ABORTED, saying the coordinator restarted while it was out). An op runs
// at most once. (At most 4 + sampling_depth tasks are out at once, so the
// kept window covers every op still out when the coordinator died, for
// sampling_depth up to 124.)
//
// Thread-safe; two threads of its own (one sends, one collects).
#ifndef LATHE_COORDINATOR_DISPATCHER_H_
#define LATHE_COORDINATOR_DISPATCHER_H_

#include <deque>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/fan_out.h"
#include "coordinator/op_ledger.h"
#include "coordinator/replica_registry.h"

namespace lathe::coordinator {

// Told of every operation the dispatcher sends and records (the operator's
// metrics and run history, coordinator/ops_metrics.h). Called from the
// dispatcher's threads, outside its lock; must not block for long.
class OpObserver {
 public:
  virtual ~OpObserver() = default;
  // An operation went to the replicas (not called for ordering points).
  virtual void Sent(const ReadyOp& op, absl::Time at) = 0;
  // An operation was recorded: `result` on success, null when it failed.
  // `sent`: when it went out (for one recovered after a restart: `now`);
  // `run`: the run's entry after it (nullopt: deleted or unknown).
  virtual void Finished(const ReadyOp& op, const lathe::v1::OpResult* result, absl::Time sent, absl::Time now,
                        const std::optional<lathe::v1::RunInfo>& run) = 0;
};

class Dispatcher {
 public:
  // Neither is owned; both outlive the dispatcher. `op_timeout` bounds one
  // operation's round trip to the replicas.
  Dispatcher(OpLedger* ledger, ReplicaRegistry* registry, absl::Duration op_timeout, int depth = 4,
             int sampling_depth = 64);
  ~Dispatcher();

  // Not owned; outlives the dispatcher. REQUIRES: before Start and Recover.
  void SetObserver(OpObserver* observer) { observer_ = observer; }
  void Start();
  // Stops taking operations; those on the replicas are collected first.
  void Stop();

  // Registers a run created by the service (before its init op runs).
  void AddRun(const lathe::v1::RunInfo& info);
  // Puts back a run restored from the journal (nothing for a deleted one).
  void RestoreRun(const lathe::v1::JournalRun& run);
  // Settles the ledger's recovered ops from the replicas' kept answers (see
  // above). REQUIRES: every replica registered, Start not yet called.
  // Returns how many ops it settled.
  int Recover();
  std::optional<lathe::v1::RunInfo> Run(const std::string& run_id) const;
  // Every run not deleted, by run id.
  std::vector<lathe::v1::RunInfo> Runs() const;
  // The sampler weights a run published as `version` (1, 2, …); nullopt when
  // it has not (yet).
  std::optional<std::string> PolicyPath(const std::string& run_id, int64_t version) const;
  int runs() const;

 private:
  // An operation sent to the replicas (or an ordering point) awaiting answers.
  struct InFlight {
    ReadyOp op;
    FanOut fan_out;
    std::vector<int64_t> task_ids;  // empty: nothing was sent
    absl::Status send_status;
    absl::Time sent;
    bool sampling = false;  // may complete before operations sent earlier
  };
  // Waits until fewer than `limit` operations are out; false when stopping.
  bool WaitForRoom(size_t limit);
  // For a sampling request that names no weights: waits for the run's
  // publications out, then names the newest. False when stopping.
  bool FollowNewestVersion(lathe::v1::SubmitRequest& op);
  void FinishEntry(InFlight& entry, absl::Duration timeout);
  // Replicas in separate jobs: brings every replica waiting to join up to
  // date (ReplicaRegistry::AdmitJoiners) before the next operation is sent,
  // expelling a joiner whose catch-up failed. Earlier operations still run
  // first on the members (each replica executes its tasks in order).
  void AdmitJoiners();
  void SendLoop();
  void CollectLoop();
  // Takes the next entry to finish: a sampling one whose answers are in, or
  // the oldest once its answers are in or its time is up; nullopt when the
  // sender stopped and nothing is left.
  std::optional<InFlight> NextToFinish();
  void Finish(InFlight& entry, absl::Duration timeout);
  // Tells the observer (if any) that `op` was recorded.
  void Observe(const ReadyOp& op, const lathe::v1::OpResult* result, absl::Time sent);
  void Finish(const ReadyOp& noop);
  // Updates the run's entry from a result; the entry after it when the
  // result changed it (for the journal), else nullopt.
  std::optional<lathe::v1::JournalRun> Record(const lathe::v1::SubmitRequest& op, lathe::v1::OpResult* result);
  // A run's journal entry. REQUIRES: mu_ held.
  lathe::v1::JournalRun StateLocked(const std::string& run_id) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  OpLedger* ledger_;
  ReplicaRegistry* registry_;
  OpObserver* observer_ = nullptr;
  const absl::Duration op_timeout_;
  const size_t depth_;
  const size_t sampling_depth_;  // >= depth_
  mutable absl::Mutex mu_;
  std::map<std::string, lathe::v1::RunInfo> runs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::vector<std::string>> policy_paths_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> publishing_ ABSL_GUARDED_BY(mu_);  // save_weights_for_sampler out, per run
  // Versions published before a run's latest init are not followed.
  std::map<std::string, size_t> followed_from_ ABSL_GUARDED_BY(mu_);
  std::deque<InFlight> in_flight_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool sender_done_ ABSL_GUARDED_BY(mu_) = false;
  std::thread sender_;
  std::thread collector_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_DISPATCHER_H_
