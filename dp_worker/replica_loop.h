// The serving loop of one replica. The leader takes tasks from the
// coordinator link and broadcasts each to the replica's ranks, which all
// execute it. Sampling requests queued one after another that use the same
// weights go as one batch (up to `max_sample_rows` samples, gathered for up
// to `sample_batch_window` after each arrival), decoded together; requests
// of the same weights that arrive while it decodes join it between steps
// (the leader sends the joining tasks, maybe none, after every step). A
// batch never reaches past a task of another kind, so tasks keep their
// order. When idle the leader broadcasts a keepalive every tick, so the
// other ranks notice a dead leader within their control timeout. On a stop
// request (SIGTERM) the leader finishes the task in flight, tells the ranks
// to stop and deregisters.
//
// Cross-rank rule: every rank of the replica runs the loop (RunLeader on
// replica rank 0, RunFollower elsewhere) until the leader's stop.
#ifndef LATHE_DP_WORKER_REPLICA_LOOP_H_
#define LATHE_DP_WORKER_REPLICA_LOOP_H_

#include <atomic>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "dp_worker/op_executor.h"
#include "dp_worker/replica_link.h"
#include "parallel/communicator.h"

namespace lathe::dp_worker {

struct LoopOptions {
  absl::Duration idle_tick = absl::Seconds(1);
  // How long a follower waits for the leader's next control message.
  absl::Duration control_timeout = absl::Minutes(10);
  // Samples (Σ num_samples) decoded in one batch; a larger request runs alone.
  int max_sample_rows = 64;
  // How long a sampling batch waits after each arrival for more requests of
  // a burst before it starts.
  absl::Duration sample_batch_window = absl::Milliseconds(2);
  // After a stop is requested, how long the leader still takes tasks the
  // coordinator sent: an operation dispatched to every replica just before
  // the signal then runs on all of them, instead of leaving the replicas
  // that took it waiting in its cross-replica collective.
  absl::Duration stop_grace = absl::Milliseconds(500);
};

// OK after a requested stop or the coordinator's Shutdown; Unavailable when
// the coordinator went away or a collective timed out (the replica must then
// leave the job: parallel::CommunicationBroken); the communicator's error
// when a control message could not be sent.
absl::Status RunLeader(ReplicaLink& link, OpExecutor& executor, parallel::Communicator& replica,
                       const std::atomic<bool>& stop, const LoopOptions& options);
// Releases the followers when the leader cannot serve (e.g. no coordinator).
absl::Status StopFollowers(parallel::Communicator& replica, const LoopOptions& options);
// OK when the leader stopped the replica; an error when the leader is gone.
absl::Status RunFollower(OpExecutor& executor, parallel::Communicator& replica, const LoopOptions& options);

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_REPLICA_LOOP_H_
