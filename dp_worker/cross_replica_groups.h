// The cross-replica groups of a replica that runs as its own job
// (dp_worker --replica_job): the data-parallel groups that span replicas
// are two-level communicators (parallel/cross_replica.h) over this job's
// MPI groups and one Gloo group per place in the replica, formed through the
// coordinator's rendezvous store under the generation the coordinator hands
// out with each task (Task.membership), and formed again when it changes.
#ifndef LATHE_DP_WORKER_CROSS_REPLICA_GROUPS_H_
#define LATHE_DP_WORKER_CROSS_REPLICA_GROUPS_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lathe/v1/replica.pb.h"
#include "parallel/context.h"
#include "parallel/cross_replica.h"
#include "parallel/rendezvous_store.h"

namespace lathe::dp_worker {

struct CrossReplicaOptions {
  // The address this rank's Gloo group listens on and advertises; empty:
  // this machine's host name.
  std::string hostname;
  // How long forming one generation's groups may take.
  absl::Duration connect_timeout = absl::Minutes(1);
};

class CrossReplicaGroups {
 public:
  // `ctx` is this job's context (a mesh of one replica); its world, data and
  // expert_data communicators are replaced by two-level ones that span the
  // live replicas (their intra-job parts stay as they were). Neither is owned.
  CrossReplicaGroups(parallel::ParallelContext* ctx, parallel::RendezvousStore* store, CrossReplicaOptions options);

  // Makes the groups those of `membership`'s generation: at once when they
  // are, else formed through the store (this rank's group is named after its
  // place in the replica, "place<k>"). ctx->place.replica becomes the
  // replica's rank in the generation. Collective over the job: every rank
  // calls it with the same membership, and all return the same status
  // (InvalidArgument for a malformed membership; the formation's error,
  // e.g. DeadlineExceeded when a replica did not show up). Sets `changed`
  // when a replica was lost since the generation held before (its
  // gradients of an unfinished step are then incomplete).
  absl::Status Join(const lathe::v1::Membership& membership, bool* changed);
  int64_t generation() const { return slot_->generation; }
  // This rank's Gloo group of the current generation (null before the first).
  parallel::Communicator* group() const { return slot_->group.get(); }

 private:
  parallel::ParallelContext* ctx_;
  parallel::RendezvousStore* store_;
  CrossReplicaOptions options_;
  std::shared_ptr<parallel::CrossReplicaSlot> slot_;
  int64_t epoch_ = 0;  // the coordinator's (Membership.epoch) of the slot's generation
};

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_CROSS_REPLICA_GROUPS_H_
