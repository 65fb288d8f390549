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

}  // namespace lathe::parallel

#endif  // LATHE_PARALLEL_RENDEZVOUS_STORE_H_
