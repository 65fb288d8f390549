// The HTTP door's sampling sessions: what a Tinker sampling_session_id
// names (a run and the sampler weights its requests read), bounded.
#ifndef LATHE_HTTP_SAMPLING_SESSIONS_H_
#define LATHE_HTTP_SAMPLING_SESSIONS_H_

#include <cstddef>
#include <deque>
#include <map>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace lathe::http {

struct SamplingSession {
  std::string run_id;
  std::string lathe_path;  // lathe://<run>/sampler_weights/<name>; empty: the base model
};

// Sessions by id, each made once per creation key (what created it: a
// create_sampling_session's (session_id, seq, path), an ephemeral save's op
// id), so a retried creation finds the same session. Holds at most
// `capacity`; adding past it forgets the oldest. Thread-safe.
class SamplingSessions {
 public:
  explicit SamplingSessions(size_t capacity) : capacity_(capacity) {}

  // The id of the session `key` created, making it from `session` if new.
  // Ids are "sampler-<16 hex>", usable as a ledger lane.
  std::string Add(const std::string& key, SamplingSession session);
  // nullopt for an unknown or forgotten id / key.
  std::optional<SamplingSession> Find(const std::string& id) const;
  std::optional<std::string> IdOf(const std::string& key) const;

 private:
  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::map<std::string, SamplingSession> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> ids_ ABSL_GUARDED_BY(mu_);  // creation key → id
  std::deque<std::string> order_ ABSL_GUARDED_BY(mu_);           // creation keys, oldest first
};

}  // namespace lathe::http

#endif  // LATHE_HTTP_SAMPLING_SESSIONS_H_
