// The HTTP door's Tinker sessions: which session ids it made, and when each
// was last heard from, so a session silent past a timeout ends (its
// heartbeat is answered 410, which stops the SDK's heartbeat loop).
#ifndef LATHE_HTTP_DOOR_SESSIONS_H_
#define LATHE_HTTP_DOOR_SESSIONS_H_

#include <cstddef>
#include <map>
#include <string>

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

 private:
  bool Expired(absl::Time last_seen, absl::Time now) const;
  void SweepLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const absl::Duration timeout_;
  const size_t capacity_;
  absl::Mutex mu_;
  std::map<std::string, absl::Time> last_seen_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lathe::http

#endif  // LATHE_HTTP_DOOR_SESSIONS_H_
