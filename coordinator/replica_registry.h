// The replicas of a deployment as the coordinator sees them: who registered,
// what model and layout they serve, whether they are alive, and the tasks
// each owes an answer for. The deployment is ready when every expected
// replica has registered; losing one (its stream breaks, its heartbeats stop
// for longer than the timeout, or it deregisters) makes the deployment
// unavailable for good: the cross-replica collectives of the survivors cannot
// complete without it.
//
// Unless the replicas are separate jobs (RegisterReplica.separate_job, every
// replica alike): then a lost replica leaves the membership instead. Its
// unanswered tasks are answered for it (SERVER, UNAVAILABLE, naming it), the
// generation goes up, and later tasks go to the live replicas only, each
// carrying the membership it runs under (Task.membership: the generation,
// the replica's rank among the live ones and their count), under which the
// replicas form their cross-replica groups. The deployment is lost only
// when no replica is left. A replica that left may register again (a new
// job with its index): it waits as a joiner, receives no tasks, until
// AdmitJoiners makes it a member of a new generation and sends every member
// the state sync that brings it up to date.
//
// Thread-safe.
#ifndef LATHE_COORDINATOR_REPLICA_REGISTRY_H_
#define LATHE_COORDINATOR_REPLICA_REGISTRY_H_

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/op_ledger.h"
#include "lathe/v1/replica.pb.h"

namespace lathe::coordinator {

// Where the registry sends a replica's messages: the replica's stream.
class ReplicaSink {
 public:
  virtual ~ReplicaSink() = default;
  // False when the stream is gone.
  virtual bool Send(const lathe::v1::CoordinatorMessage& message) = 0;
  // Ends the stream from the coordinator's side (a silent replica).
  virtual void Cancel() = 0;
};

enum class DeploymentState { kStarting, kServing, kLost, kShuttingDown };

class ReplicaRegistry {
 public:
  ReplicaRegistry(int expected_replicas, absl::Duration heartbeat_timeout, const Clock* clock = &RealClock());

  // A replica leader's registration. InvalidArgument for an index outside
  // [0, expected) or a layout whose replica count differs from the
  // coordinator's; AlreadyExists for an index registered before;
  // FailedPrecondition when its model or layout differs from the replicas
  // already registered, or once the deployment is lost or shutting down.
  // `sink` is not owned and stays valid until Disconnected(replica).
  absl::Status Register(const lathe::v1::RegisterReplica& registration, ReplicaSink* sink);
  // Sends a heartbeat to every connected replica (so each can tell a silent
  // coordinator). Call it every heartbeat interval.
  void SendHeartbeats();
  // Replica `replica` cannot serve (`why`, e.g. its model was refused): the
  // deployment cannot start and says why (kLost, detail "replica N refused
  // to start: why"). Ignored unless the deployment is starting and that
  // replica has not registered.
  void Refused(int replica, const std::string& why);
  // Any message from the replica counts as a heartbeat.
  void Heard(int replica);
  void Deliver(int replica, const lathe::v1::TaskResult& result);
  // The replica's stream ended (cleanly after a deregistration or not).
  // The replica is lost unless the deployment is shutting down.
  void Disconnected(int replica, const std::string& reason);
  // Loses every replica silent for longer than the heartbeat timeout. Call
  // it periodically, well within half the timeout: a longer gap since the
  // last call means the coordinator itself stalled (SIGSTOP, starvation),
  // and every replica then gets a fresh window instead of being lost.
  void CheckHeartbeats();

  // Sends tasks[i] to replica i (assigning task ids, returned in replica
  // order; a task without an op is not sent and its id is -1). Replicas
  // execute their tasks in the order sent. Unavailable when the deployment
  // is not serving. REQUIRES: tasks.size() == members().
  absl::StatusOr<std::vector<int64_t>> Send(std::vector<lathe::v1::Task> tasks);
  // Send, with the tasks made by `split` for the number of live members at
  // the time of sending (one task per member, in rank order; members() for
  // a deployment in one job: every replica), so a replica leaving in between
  // cannot mismatch them. `split` is called under the registry's lock and
  // must not call back into it.
  absl::StatusOr<std::vector<int64_t>> SendSplit(const std::function<std::vector<lathe::v1::Task>(int)>& split);
  // The replicas tasks go to now: every expected one, or for separate jobs
  // the live members.
  int members() const;
  // The current membership generation (separate jobs; 0 otherwise).
  int64_t generation() const;
  // Whether a replica waits to join (separate jobs).
  bool joiners() const;
  // Makes the waiting joiners members of a new generation and sends every
  // member a state sync (Task.sync with `runs`, from the first replica that
  // was a member before); the sync tasks' ids, empty when nobody waits.
  // `admitted` gets the joiners' indices.
  absl::StatusOr<std::vector<int64_t>> AdmitJoiners(const std::vector<lathe::v1::RunInfo>& runs,
                                                    std::vector<int>* admitted);
  // Ends replica `replica`'s stream and drops it (a joiner that could not
  // catch up).
  void Expel(int replica, const std::string& reason);
  // Waits for the answers of the tasks `ids` (from one Send) and takes them
  // (an empty answer for id -1).
  // Unavailable when a replica is lost before it answers; DeadlineExceeded
  // past `timeout`.
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> Collect(const std::vector<int64_t>& ids,
                                                             absl::Duration timeout);
  // Waits up to `timeout` until every answer of one of `sets` (task ids of
  // one Send each) has arrived, or the deployment stops serving; the index
  // of the first such set, or -1 (also early, when another answer arrived:
  // the caller's sets may have changed).
  int AwaitAnswered(const std::vector<std::vector<int64_t>>& sets, absl::Duration timeout);
  // Send, then Collect.
  absl::StatusOr<std::vector<lathe::v1::TaskResult>> RunOnAll(std::vector<lathe::v1::Task> tasks,
                                                              absl::Duration timeout);

  // The answer replica `replica` reported at registration (RegisterReplica.
  // kept) for op `op_id`, or nullopt. Used once after a restart, then freed
  // with ForgetKept.
  std::optional<lathe::v1::TaskResult> Kept(int replica, const std::string& op_id) const;
  void ForgetKept();

  // Tells every replica to stop and refuses new work.
  void Shutdown(const std::string& reason);

  // Called once, with the reason, when the deployment is lost.
  void OnLost(std::function<void(const std::string&)> callback);

  DeploymentState state() const;
  std::string detail() const;  // why the deployment is lost, or who is missing
  int registered() const;
  int expected() const { return expected_; }
  absl::Duration heartbeat_timeout() const { return heartbeat_timeout_; }
  // The registered replicas' model and layout (empty before the first).
  lathe::v1::ModelSummary model() const;
  lathe::v1::Layout layout() const;

  // One replica as an operator sees it (docs/operations.md).
  struct ReplicaStatus {
    int replica = 0;
    bool registered = false;  // registered and not (yet) lost
    bool connected = false;   // its stream is open
    absl::Duration heartbeat_age = absl::InfiniteDuration();  // since it was last heard; infinite: never
    std::string host;
    int64_t pid = 0;
  };
  // Every expected replica, in index order.
  std::vector<ReplicaStatus> Statuses() const;

 private:
  struct Replica {
    ReplicaSink* sink = nullptr;
    absl::Time last_heard;
    bool connected = false;
    bool joining = false;  // registered again, not yet a member (separate jobs)
    std::map<std::string, lathe::v1::TaskResult> kept;  // by op id
    std::string host;  // of its leader, as it registered
    int64_t pid = 0;
    bool heard = false;  // registered at least once
  };
  void LoseLocked(const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replica `replica` is gone: the deployment is lost, or for separate jobs
  // the replica leaves the membership (see above).
  void DropLocked(int replica, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<int> live_locked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void SetMembership(lathe::v1::Task& task, int rank, int size) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  std::string detail_locked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  int registered_locked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const int expected_;
  const absl::Duration heartbeat_timeout_;
  const Clock* clock_;
  mutable absl::Mutex mu_;
  absl::Time last_check_ ABSL_GUARDED_BY(mu_);  // of CheckHeartbeats
  std::vector<Replica> replicas_ ABSL_GUARDED_BY(mu_);
  DeploymentState state_ ABSL_GUARDED_BY(mu_) = DeploymentState::kStarting;
  std::string lost_reason_ ABSL_GUARDED_BY(mu_);
  lathe::v1::ModelSummary model_ ABSL_GUARDED_BY(mu_);
  lathe::v1::Layout layout_ ABSL_GUARDED_BY(mu_);
  int64_t next_task_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Answers received for the tasks in flight, by task id.
  std::map<int64_t, lathe::v1::TaskResult> answers_ ABSL_GUARDED_BY(mu_);
  int64_t delivered_ ABSL_GUARDED_BY(mu_) = 0;  // answers ever delivered
  bool separate_ ABSL_GUARDED_BY(mu_) = false;  // the replicas are separate jobs
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t last_loss_generation_ ABSL_GUARDED_BY(mu_) = 0;
  const int64_t epoch_;  // Membership.epoch: this registry's, at random
  std::map<int64_t, int> owner_ ABSL_GUARDED_BY(mu_);  // unanswered task id -> replica (separate jobs)
  std::string left_ ABSL_GUARDED_BY(mu_);  // which replicas left, for detail()
  std::function<void(const std::string&)> on_lost_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_REPLICA_REGISTRY_H_
