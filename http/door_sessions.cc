// Session liveness for the HTTP door.
#include "http/door_sessions.h"

#include <algorithm>

namespace lathe::http {

bool DoorSessions::Expired(absl::Time last_seen, absl::Time now) const {
  return timeout_ > absl::ZeroDuration() && timeout_ != absl::InfiniteDuration() && now - last_seen > timeout_;
}

void DoorSessions::SweepLocked(absl::Time now, bool room) {
  last_sweep_ = now;
  for (auto it = last_seen_.begin(); it != last_seen_.end();) {
    if (!Expired(it->second, now)) {
      ++it;
      continue;
    }
    ended_.push_back(it->first);
    it = last_seen_.erase(it);
  }
  while (room && last_seen_.size() >= capacity_ && !last_seen_.empty()) {
    auto oldest = std::min_element(last_seen_.begin(), last_seen_.end(),
                                   [](const auto& a, const auto& b) { return a.second < b.second; });
    ended_.push_back(oldest->first);
    last_seen_.erase(oldest);
  }
}

void DoorSessions::Add(const std::string& id, absl::Time now) {
  absl::MutexLock lock(&mu_);
  SweepLocked(now, /*room=*/true);
  last_seen_[id] = now;
}

bool DoorSessions::Touch(const std::string& id, absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (now - last_sweep_ >= absl::Seconds(1)) SweepLocked(now, /*room=*/false);
  auto it = last_seen_.find(id);
  if (it == last_seen_.end()) return false;
  if (Expired(it->second, now)) {
    ended_.push_back(it->first);
    last_seen_.erase(it);
    return false;
  }
  it->second = now;
  return true;
}

void DoorSessions::End(const std::string& id) {
  absl::MutexLock lock(&mu_);
  if (last_seen_.erase(id) > 0) ended_.push_back(id);
}

std::vector<std::string> DoorSessions::TakeEnded(absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (now - last_sweep_ >= absl::Seconds(1)) SweepLocked(now, /*room=*/false);
  std::vector<std::string> ended;
  ended.swap(ended_);
  return ended;
}

}  // namespace lathe::http
