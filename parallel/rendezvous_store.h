// Where the members of a group that spans separate jobs find each other: a
// key-value store with generations (the coordinator serves the deployment's
// over the replica link: dp_worker/link_store.h, coordinator/rendezvous_store.h).
#ifndef LATHE_PARALLEL_RENDEZVOUS_STORE_H_
#define LATHE_PARALLEL_RENDEZVOUS_STORE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lathe::parallel {

// Keys live in generations (>= 1): once any member writes a newer
// generation, the older ones are gone and calls naming them fail with
// FailedPrecondition. Implementations are thread-safe.
class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  // Sets `key` of `generation`; FailedPrecondition for a generation that is
  // over, Unavailable when the store cannot be reached.
  virtual absl::Status Set(int64_t generation, const std::string& key, const std::string& value) = 0;
  // The values of `keys`, in order, once all are set; DeadlineExceeded
  // after `timeout`, FailedPrecondition when the generation is or becomes
  // over, Unavailable when the store cannot be reached.
  virtual absl::StatusOr<std::vector<std::string>> Get(int64_t generation, const std::vector<std::string>& keys,
                                                       absl::Duration timeout) = 0;
};

// A group whose members are separate jobs, formed through a RendezvousStore
// (MakeGlooCommunicator; MakeNcclCommunicatorFromStore on GPUs).
struct StoreGroupOptions {
  int rank = 0;  // in the group, 0 … size-1
  int size = 1;
  // The membership epoch (>= 1): the group's keys are written under it, so
  // members of a rebuilt group never connect to the group it replaces.
  int64_t generation = 1;
  // Names the group inside its generation (several groups may form in one,
  // e.g. one per tensor-parallel position); letters, digits, '_', '-', '.'.
  std::string group = "replicas";
  // Gloo: the address this member listens on and tells its peers (a host
  // name or an IP address of this machine); empty: this machine's host name.
  std::string hostname;
  // How long forming the group may take: every member must have written its
  // address and connected within it.
  absl::Duration connect_timeout = absl::Minutes(1);
};

// InvalidArgument naming the culprit: size < 1, rank outside [0, size),
// generation < 1, a group name that is empty, longer than 128 characters or
// holds other characters, a connect_timeout that is not positive.
absl::Status ValidateStoreGroupOptions(const StoreGroupOptions& options);

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_RENDEZVOUS_STORE_H_
