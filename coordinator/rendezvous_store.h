// The deployment's rendezvous store: a small key-value store, served over the
// replica link (StoreSet / StoreGet), through which the ranks of a
// cross-replica group, each in its own job, exchange their addresses before
// they connect (parallel/gloo_communicator.h).
//
// Keys live in generations. The first Set of a newer generation drops every
// key of the older ones and wakes their waiters, and any call naming an older
// generation fails with FailedPrecondition: a group rebuilt after a member
// left never reads the addresses of the group it replaces.
//
// Thread-safe.
#ifndef LATHE_COORDINATOR_RENDEZVOUS_STORE_H_
#define LATHE_COORDINATOR_RENDEZVOUS_STORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace lathe::coordinator {

// Bounds on what one generation holds (a group's key per member, a few
// hundred bytes each).
inline constexpr size_t kMaxStoreKeyBytes = 512;
inline constexpr size_t kMaxStoreValueBytes = size_t{1} << 20;
inline constexpr size_t kMaxStoreKeys = 1 << 16;
// The longest a Get may wait, and how often it looks whether its caller left.
inline constexpr absl::Duration kMaxStoreWait = absl::Minutes(10);
inline constexpr absl::Duration kStorePoll = absl::Milliseconds(100);

class RendezvousStore {
 public:
  // InvalidArgument for a generation < 1, an empty or oversized key or an
  // oversized value; FailedPrecondition for a generation older than the
  // newest seen; ResourceExhausted when the generation holds kMaxStoreKeys
  // other keys. A key set again takes the new value.
  absl::Status Set(int64_t generation, const std::string& key, std::string value);
  // The values of `keys` once all are set. DeadlineExceeded (naming the
  // missing keys) after `timeout` (at most kMaxStoreWait); FailedPrecondition
  // when `generation` is or becomes older than the newest; InvalidArgument
  // for a generation < 1, no keys or a bad key. `cancelled`, when given, is
  // polled every kStorePoll: once it answers true the wait ends with
  // Cancelled (the caller went away, or the server is stopping).
  absl::StatusOr<std::vector<std::string>> Get(int64_t generation, const std::vector<std::string>& keys,
                                               absl::Duration timeout,
                                               const std::function<bool()>& cancelled = nullptr);
  // The newest generation seen (0 before the first Set).
  int64_t generation() const;

 private:
  absl::Status CheckGeneration(int64_t generation) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);  // of generation_
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_RENDEZVOUS_STORE_H_
