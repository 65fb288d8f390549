// The HTTP door's Tinker sessions: which session ids it made, and when each
// was last heard from, so a session silent past a timeout ends (its
// heartbeat is answered 410, which stops the SDK's heartbeat loop), and which
// sessions ended since the door last asked (their ephemeral sampler weights
// are removed).
#ifndef LATHE_HTTP_DOOR_SESSIONS_H_
#define LATHE_HTTP_DOOR_SESSIONS_H_

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace lathe::http {

// Thread-safe. Holds at most `capacity` live sessions; adding past it ends
// the one silent longest.
class DoorSessions {
 public:
  // `timeout` <= 0 (or InfiniteDuration): sessions never expire.
  DoorSessions(absl::Duration timeout, size_t capacity) : timeout_(timeout), capacity_(capacity) {}

  void Add(const std::string& id, absl::Time now);
  // Marks the session heard from now; false when it is unknown, ended or
  // has been silent longer than the timeout (it is then forgotten).
  bool Touch(const std::string& id, absl::Time now);
  void End(const std::string& id);
  // The sessions that ended (finished, expired or pushed out) since the last
  // call, each once. Expiry is noticed at most a second late whenever any
  // session is added or touched.
  std::vector<std::string> TakeEnded(absl::Time now);

 private:
  bool Expired(absl::Time last_seen, absl::Time now) const;
  // Ends the expired sessions, and the silent-longest ones past capacity
  // when `room` is true (one is about to be added).
  void SweepLocked(absl::Time now, bool room) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const absl::Duration timeout_;
  const size_t capacity_;
  absl::Mutex mu_;
  std::map<std::string, absl::Time> last_seen_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> ended_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sweep_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

}  // namespace lathe::http

#endif  // LATHE_HTTP_DOOR_SESSIONS_H_
