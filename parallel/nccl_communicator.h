// The NCCL backend of Communicator: collectives on CUDA device buffers.
// Built when CUDA and NCCL headers are found (LATHE_HAVE_NCCL).
//
// The world communicator is bootstrapped from an ncclUniqueId that rank 0
// broadcasts over MPI_COMM_WORLD; groups are split from it. Communicators
// are non-blocking: every call polls to completion against its timeout, and
// a timeout aborts the NCCL communicator (then FailedPrecondition, as MPI's).
#ifndef LATHE_PARALLEL_NCCL_COMMUNICATOR_H_
#define LATHE_PARALLEL_NCCL_COMMUNICATOR_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/context.h"
#include "parallel/rendezvous_store.h"

namespace lathe::parallel {

class NcclWorld {
 public:
  // Collective over MPI_COMM_WORLD; this rank uses CUDA device `device`.
  // REQUIRES: MPI is initialised. FailedPrecondition without a usable device.
  static absl::StatusOr<std::unique_ptr<NcclWorld>> Create(int device, absl::Duration timeout);
  virtual ~NcclWorld() = default;

  // Every world rank (ascending ids, this rank among them).
  virtual Communicator& world() = 0;
  // A communicator over `world_ranks` (ascending, this rank among them),
  // split from the world. Collective over the world: every rank calls it
  // with its own group, and the groups of one call partition the world.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> Split(const std::vector<int>& world_ranks) = 0;
};

// Turns every communicator of `ctx` (MPI, from MakeMpiContext) into a routed
// one (MakeRoutedCommunicator) whose device buffers go to an NCCL
// communicator over the same ranks, on CUDA device `device`; ctx keeps the
// NCCL state alive. Collective over the world: every rank calls it, once,
// right after MakeMpiContext. FailedPrecondition without a usable device.
absl::Status AttachNccl(ParallelContext& ctx, int device);

// An NCCL communicator between separate jobs (the cross-replica group on
// GPUs, next to MakeGlooCommunicator's on hosts), without MPI: member 0
// draws an ncclUniqueId and writes it to `store` as "<group>/nccl_id" of
// options.generation, the others read it, and every member joins on CUDA
// device `device` within options.connect_timeout (options.hostname is
// unused). InvalidArgument for bad options; FailedPrecondition without a
// usable device; the store's errors; DeadlineExceeded when a member did
// not join in time. Its collectives time out as every NCCL communicator's:
// the communicator is aborted and the process's communication is broken
// (MarkCommunicationBroken), so a survivor on a GPU restarts its process
// rather than forming the next generation in place.
absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicatorFromStore(const StoreGroupOptions& options,
                                                                            RendezvousStore* store, int device);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_NCCL_COMMUNICATOR_H_
