// Bounded map of sampling sessions, oldest forgotten first.
#include "http/sampling_sessions.h"


#include "core/random_id.h"

namespace lathe::http {

std::string SamplingSessions::Add(const std::string& key, SamplingSession session) {
  absl::MutexLock lock(&mu_);
  if (auto it = ids_.find(key); it != ids_.end()) return it->second;
  while (!order_.empty() && order_.size() >= capacity_) {
    if (auto old = ids_.find(order_.front()); old != ids_.end()) {
      sessions_.erase(old->second);
      ids_.erase(old);
    }
    order_.pop_front();
  }
  std::string id;
  do {
    id = runtime::RandomId("sampler");
  } while (sessions_.count(id) > 0);
  sessions_.emplace(id, std::move(session));
  ids_.emplace(key, id);
  order_.push_back(key);
  return id;
}

std::optional<SamplingSession> SamplingSessions::Find(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> SamplingSessions::IdOf(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  auto it = ids_.find(key);
  if (it == ids_.end()) return std::nullopt;
  return it->second;
}

}  // namespace lathe::http
