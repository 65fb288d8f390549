// The coordinator's rendezvous store: one map for the newest generation.
#include "coordinator/rendezvous_store.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lathe::coordinator {
namespace {

absl::Status CheckKey(const std::string& key) {
  if (key.empty()) return absl::InvalidArgumentError("store key is empty");
  if (key.size() > kMaxStoreKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("store key of ", key.size(), " bytes (at most ", kMaxStoreKeyBytes, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RendezvousStore::CheckGeneration(int64_t generation) const {
  if (generation < 1) {
    return absl::InvalidArgumentError(absl::StrCat("store generation ", generation, " (must be >= 1)"));
  }
  if (generation < generation_) {
    return absl::FailedPreconditionError(
        absl::StrCat("store generation ", generation, " is over: the deployment is at generation ", generation_));
  }
  return absl::OkStatus();
}

absl::Status RendezvousStore::Set(int64_t generation, const std::string& key, std::string value) {
  if (absl::Status s = CheckKey(key); !s.ok()) return s;
  if (value.size() > kMaxStoreValueBytes) {
    return absl::InvalidArgumentError(absl::StrCat("value of store key \"", key, "\" holds ", value.size(),
                                                   " bytes (at most ", kMaxStoreValueBytes, ")"));
  }
  absl::MutexLock lock(&mu_);
  if (absl::Status s = CheckGeneration(generation); !s.ok()) return s;
  if (generation > generation_) {
    // Waiters on the old generation wake (their condition checks generation_).
    generation_ = generation;
    values_.clear();
  }
  if (values_.size() >= kMaxStoreKeys && !values_.count(key)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("store generation ", generation, " already holds ", kMaxStoreKeys, " keys"));
  }
  values_[key] = std::move(value);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> RendezvousStore::Get(int64_t generation,
                                                              const std::vector<std::string>& keys,
                                                              absl::Duration timeout,
                                                              const std::function<bool()>& cancelled) {
  if (keys.empty()) return absl::InvalidArgumentError("store get names no key");
  for (const std::string& key : keys) {
    if (absl::Status s = CheckKey(key); !s.ok()) return s;
  }
  timeout = std::clamp(timeout, absl::ZeroDuration(), kMaxStoreWait);
  absl::MutexLock lock(&mu_);
  auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    if (generation_ > generation) return true;  // over: fails below
    if (generation_ < generation) return false;  // not started yet
    return std::all_of(keys.begin(), keys.end(), [&](const std::string& k) { return values_.count(k) > 0; });
  };
  const absl::Time deadline = absl::Now() + timeout;
  while (!mu_.AwaitWithDeadline(absl::Condition(&ready),
                                cancelled ? std::min(deadline, absl::Now() + kStorePoll) : deadline)) {
    if (absl::Now() >= deadline) break;
    if (cancelled()) return absl::CancelledError("store get: the caller went away");
  }
  if (absl::Status s = CheckGeneration(generation); !s.ok()) return s;
  std::vector<std::string> values, missing;
  for (const std::string& key : keys) {
    auto it = generation_ == generation ? values_.find(key) : values_.end();
    if (it == values_.end()) {
      missing.push_back(key);
    } else {
      values.push_back(it->second);
    }
  }
  if (!missing.empty()) {
    return absl::DeadlineExceededError(absl::StrCat("store generation ", generation, ": key(s) ",
                                                    absl::StrJoin(missing, ", "), " not set within ",
                                                    absl::FormatDuration(timeout)));
  }
  return values;
}

int64_t RendezvousStore::generation() const {
  absl::MutexLock lock(&mu_);
  return generation_;
}

}  // namespace lathe::coordinator
