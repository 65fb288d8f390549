// Groups that span replicas running as separate jobs: a part inside the job
// (MPI) and a part between the jobs (a Gloo group of the ranks at the same
// place in every live replica, re-formed at each membership generation).
#ifndef LATHE_PARALLEL_CROSS_REPLICA_H_
#define LATHE_PARALLEL_CROSS_REPLICA_H_

#include <cstdint>
#include <memory>

#include "parallel/communicator.h"

namespace lathe::parallel {

// This rank's group among the ranks at its place (tp, cp, ep, data-group
// position) in every live replica, for one generation. Swapped when the
// membership changes; the two-level communicators that share it follow.
struct CrossReplicaSlot {
  std::unique_ptr<Communicator> group;  // null before the first generation, or after its loss
  int64_t generation = 0;
};

// A group made of `intra` (ranks of this job) in every live replica:
// member rank = cross rank × intra size + intra rank, size = cross size ×
// intra size, as if the replicas were blocks of one world. Each collective
// runs inside the job, then across the replicas on `slot`'s group, and ends
// with an agreement inside the job on whether the cross part succeeded, so
// the members of `intra` always return the same outcome (Unavailable when a
// peer replica was lost; every later call fails until the slot holds a new
// generation's group). All-reduce (sum, max), all-gather, broadcast and
// barrier; reduce-scatter and all-to-all are Unimplemented (no group
// spanning replicas uses them). Host buffers only: the Gloo part carries
// host data. Every member of `intra` calls the same collectives; every rank
// of a replica that shares `slot` calls its groups' collectives in the same
// order in every replica (the same program: one Gloo tag sequence).
std::unique_ptr<Communicator> MakeTwoLevelCommunicator(std::unique_ptr<Communicator> intra,
                                                       std::shared_ptr<CrossReplicaSlot> slot);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_CROSS_REPLICA_H_
