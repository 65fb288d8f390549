// A Communicator between separate jobs: Gloo over TCP, its members found
// through a RendezvousStore. The cross-replica group of a deployment whose
// replicas leave and join: when membership changes, every member builds a
// new communicator for the next generation.
#ifndef LATHE_PARALLEL_GLOO_COMMUNICATOR_H_
#define LATHE_PARALLEL_GLOO_COMMUNICATOR_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "parallel/communicator.h"
#include "parallel/rendezvous_store.h"

namespace lathe::parallel {

// Forms the group: writes this member's address, reads the others' and
// connects to every one. Every member of the group calls it with the same
// size, generation and group. InvalidArgument for bad options; the store's
// errors (FailedPrecondition for a generation that is over); DeadlineExceeded
// when a member did not show up within connect_timeout; Unavailable when a
// peer could not be reached.
//
// Collectives follow communicator.h, with one difference: a collective that
// times out or loses a peer (its process died, its connection broke) breaks
// this communicator only (every later call: FailedPrecondition), not the
// process (CommunicationBroken stays false): Gloo holds the buffers of an
// abandoned collective through weak references, so nothing is written into
// them after the call returned, and the survivors form the next generation.
// A lost peer fails the call with Unavailable, a timeout with
// DeadlineExceeded. Host buffers only (a device buffer: FailedPrecondition).
// ReduceScatterSum runs as an all-reduce of a scratch copy (this Gloo has no
// reduce-scatter with unbound buffers): twice a reduce-scatter's traffic.
// Not thread-safe: one thread calls the collectives. The first call sets
// SIGPIPE to be ignored (unless the program handles it): Gloo writes to its
// sockets without MSG_NOSIGNAL, so a peer's death would otherwise kill this
// process.
absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(const StoreGroupOptions& options,
                                                                   RendezvousStore* store);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_GLOO_COMMUNICATOR_H_
