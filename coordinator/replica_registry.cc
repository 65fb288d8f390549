// Registration, liveness and task round trips of the replicas.
#include "coordinator/replica_registry.h"

#include <google/protobuf/util/message_differencer.h>

#include <algorithm>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/log.h"
#include "core/op_error.h"

namespace lathe::coordinator {

ReplicaRegistry::ReplicaRegistry(int expected_replicas, absl::Duration heartbeat_timeout, const Clock* clock)
    : expected_(expected_replicas), heartbeat_timeout_(heartbeat_timeout), clock_(clock),
      epoch_(static_cast<int64_t>(std::random_device{}() >> 1) << 31 ^ std::random_device{}()),
      last_check_(clock->Now()), replicas_(expected_replicas) {}

void ReplicaRegistry::SetMembership(lathe::v1::Task& task, int rank, int size) const {
  lathe::v1::Membership* m = task.mutable_membership();
  m->set_generation(generation_);
  m->set_rank(rank);
  m->set_size(size);
  m->set_last_loss_generation(last_loss_generation_);
  m->set_epoch(epoch_);
}

absl::Status ReplicaRegistry::Register(const lathe::v1::RegisterReplica& r, ReplicaSink* sink) {
  absl::MutexLock lock(&mu_);
  if (state_ == DeploymentState::kLost || state_ == DeploymentState::kShuttingDown) {
    return absl::FailedPreconditionError(absl::StrCat("the deployment no longer accepts replicas: ", lost_reason_));
  }
  if (r.replica() < 0 || r.replica() >= expected_) {
    return absl::InvalidArgumentError(
        absl::StrCat("replica ", r.replica(), " outside the coordinator's ", expected_, " replicas"));
  }
  if (r.layout().replicas() != expected_) {
    return absl::InvalidArgumentError(absl::StrCat("the workers were started with --replicas ", r.layout().replicas(),
                                                   ", the coordinator with --replicas ", expected_));
  }
  Replica& slot = replicas_[r.replica()];
  if (slot.sink != nullptr) return absl::AlreadyExistsError(absl::StrCat("replica ", r.replica(), " is registered"));
  if (registered_locked() > 0 && r.separate_job() != separate_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "replica ", r.replica(), (r.separate_job() ? " is" : " is not"),
        " a job of its own (dp_worker --replica_index) but the replicas registered before ",
        (separate_ ? "are" : "are not")));
  }
  // A serving deployment of separate jobs takes a replica that left back.
  const bool joining = state_ == DeploymentState::kServing;
  if (joining && !(separate_ && r.separate_job())) {
    return absl::FailedPreconditionError(absl::StrCat("replica ", r.replica(), " cannot join a serving deployment"));
  }
  if (registered_locked() > 0) {
    using google::protobuf::util::MessageDifferencer;
    if (!MessageDifferencer::Equals(model_, r.model()) || !MessageDifferencer::Equals(layout_, r.layout())) {
      return absl::FailedPreconditionError(absl::StrCat("replica ", r.replica(), " serves ", r.model().ShortDebugString(),
                                                        " / ", r.layout().ShortDebugString(), ", the others ",
                                                        model_.ShortDebugString(), " / ", layout_.ShortDebugString()));
    }
  }
  model_ = r.model();
  layout_ = r.layout();
  separate_ = r.separate_job();
  slot.sink = sink;
  slot.connected = true;
  slot.joining = joining;
  slot.kept.clear();
  for (const lathe::v1::KeptAnswer& k : r.kept()) slot.kept[k.op_id()] = k.answer();
  slot.last_heard = clock_->Now();
  slot.host = r.host();
  slot.pid = r.pid();
  slot.heard = true;
  if (joining) {
    LATHE_LOG(Info, "replica %d registered again: it joins at the next operation", r.replica());
    return absl::OkStatus();
  }
  if (registered_locked() == expected_) {
    state_ = DeploymentState::kServing;
    if (separate_) ++generation_;
  }
  return absl::OkStatus();
}

void ReplicaRegistry::SendHeartbeats() {
  lathe::v1::CoordinatorMessage beat;
  beat.mutable_heartbeat();
  absl::MutexLock lock(&mu_);
  for (Replica& slot : replicas_) {
    // A failed send shows up as the replica's disconnection.
    if (slot.connected && slot.sink != nullptr) slot.sink->Send(beat);
  }
}

void ReplicaRegistry::Refused(int replica, const std::string& why) {
  absl::MutexLock lock(&mu_);
  // Only a replica the deployment still waits for can fail its start: a
  // stale or duplicate worker cannot take a serving deployment down.
  if (state_ != DeploymentState::kStarting || replica < 0 || replica >= expected_) return;
  if (replicas_[replica].sink != nullptr) return;
  LoseLocked(absl::StrCat("replica ", replica, " refused to start: ", why));
}

void ReplicaRegistry::Heard(int replica) {
  absl::MutexLock lock(&mu_);
  if (replica >= 0 && replica < expected_) replicas_[replica].last_heard = clock_->Now();
}

void ReplicaRegistry::Deliver(int replica, const lathe::v1::TaskResult& result) {
  absl::MutexLock lock(&mu_);
  if (replica >= 0 && replica < expected_) replicas_[replica].last_heard = clock_->Now();
  if (separate_) {
    // Only the replica a task went to answers it, and only until it was
    // answered for (the replica left).
    auto it = owner_.find(result.task_id());
    if (it == owner_.end() || it->second != replica) return;
    owner_.erase(it);
  }
  answers_[result.task_id()] = result;
  ++delivered_;
}

void ReplicaRegistry::Disconnected(int replica, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  Replica& slot = replicas_[replica];
  slot.sink = nullptr;
  if (!slot.connected) return;
  slot.connected = false;
  if (state_ != DeploymentState::kShuttingDown) DropLocked(replica, absl::StrCat("replica ", replica, " left: ", reason));
}

void ReplicaRegistry::CheckHeartbeats() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_->Now();
  const absl::Duration gap = now - last_check_;
  last_check_ = now;
  if (gap > heartbeat_timeout_ / 2) {
    // The coordinator itself did not run (paused, starved): the replicas'
    // heartbeats of that time may still sit unread in its sockets. Its own
    // silence is not theirs: every replica gets a fresh window.
    LATHE_LOG(Warning, "the coordinator did not check heartbeats for %s; every replica gets a new window",
              absl::FormatDuration(gap));
    for (Replica& slot : replicas_) slot.last_heard = std::max(slot.last_heard, now);
    return;
  }
  for (int i = 0; i < expected_; ++i) {
    Replica& slot = replicas_[i];
    if (!slot.connected || now - slot.last_heard <= heartbeat_timeout_) continue;
    slot.connected = false;
    if (slot.sink != nullptr) slot.sink->Cancel();
    DropLocked(i, absl::StrCat("replica ", i, " sent no heartbeat for ", absl::FormatDuration(now - slot.last_heard)));
  }
}

void ReplicaRegistry::LoseLocked(const std::string& reason) {
  if (state_ == DeploymentState::kLost) return;
  state_ = DeploymentState::kLost;
  lost_reason_ = reason;
  if (on_lost_) {
    auto callback = on_lost_;
    mu_.Unlock();
    callback(reason);
    mu_.Lock();
  }
}

void ReplicaRegistry::DropLocked(int replica, const std::string& reason) {
  if (!separate_ || state_ != DeploymentState::kServing) return LoseLocked(reason);
  const bool member = !replicas_[replica].joining;
  replicas_[replica].joining = false;
  const std::vector<int> live = live_locked();
  if (live.empty()) return LoseLocked(absl::StrCat(reason, "; no replica is left"));
  if (member) {
    last_loss_generation_ = ++generation_;
    left_ = absl::StrCat(reason, "; generation ", generation_, " serves on ", live.size(), " of ", expected_,
                         " replicas (", absl::StrJoin(live, ", "), ")");
    LATHE_LOG(Warning, "%s", left_);
  } else {
    LATHE_LOG(Warning, "%s before it joined", reason);
  }
  // What it owed is answered for it: its operations fail, the others go on.
  for (auto it = owner_.begin(); it != owner_.end();) {
    if (it->second != replica) {
      ++it;
      continue;
    }
    lathe::v1::TaskResult& answer = answers_[it->first];
    answer.set_task_id(it->first);
    *answer.mutable_error() = runtime::MakeOpError(lathe::v1::OpError::SERVER, absl::StatusCode::kUnavailable,
                                                   absl::StrCat(reason, " before it answered this operation"));
    ++delivered_;
    it = owner_.erase(it);
  }
}

std::vector<int> ReplicaRegistry::live_locked() const {
  std::vector<int> live;
  for (int i = 0; i < expected_; ++i) {
    if (replicas_[i].connected && replicas_[i].sink != nullptr && !replicas_[i].joining) live.push_back(i);
  }
  return live;
}

bool ReplicaRegistry::joiners() const {
  absl::MutexLock lock(&mu_);
  for (const Replica& slot : replicas_) {
    if (slot.joining && slot.connected) return true;
  }
  return false;
}

absl::StatusOr<std::vector<int64_t>> ReplicaRegistry::AdmitJoiners(const std::vector<lathe::v1::RunInfo>& runs,
                                                                   std::vector<int>* admitted) {
  absl::MutexLock lock(&mu_);
  admitted->clear();
  if (state_ != DeploymentState::kServing) return std::vector<int64_t>();
  const std::vector<int> before = live_locked();
  for (int i = 0; i < expected_; ++i) {
    Replica& slot = replicas_[i];
    if (!slot.joining || !slot.connected || slot.sink == nullptr) continue;
    slot.joining = false;
    admitted->push_back(i);
  }
  if (admitted->empty()) return std::vector<int64_t>();
  ++generation_;
  const std::vector<int> live = live_locked();
  const int source = static_cast<int>(std::find(live.begin(), live.end(), before.at(0)) - live.begin());
  left_ = live.size() == static_cast<size_t>(expected_)
              ? std::string()
              : absl::StrCat("generation ", generation_, " serves on ", live.size(), " of ", expected_,
                             " replicas (", absl::StrJoin(live, ", "), ")");
  LATHE_LOG(Info, "replica(s) %s join: generation %d, %d replicas; state from replica %d",
            absl::StrJoin(*admitted, ", "), generation_, live.size(), before[0]);
  std::vector<int64_t> ids;
  for (size_t k = 0; k < live.size(); ++k) {
    lathe::v1::Task task;
    task.mutable_op()->mutable_noop();
    task.set_task_id(next_task_id_++);
    lathe::v1::SyncState* sync = task.mutable_sync();
    sync->set_source(source);
    for (const lathe::v1::RunInfo& run : runs) *sync->add_runs() = run;
    SetMembership(task, static_cast<int>(k), static_cast<int>(live.size()));
    owner_[task.task_id()] = live[k];
    ids.push_back(task.task_id());
    lathe::v1::CoordinatorMessage message;
    *message.mutable_task() = std::move(task);
    replicas_[live[k]].sink->Send(message);
  }
  return ids;
}

void ReplicaRegistry::Expel(int replica, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (replica < 0 || replica >= expected_) return;
  Replica& slot = replicas_[replica];
  if (!slot.connected) return;
  slot.connected = false;
  if (slot.sink != nullptr) slot.sink->Cancel();
  DropLocked(replica, absl::StrCat("replica ", replica, " ", reason));
}

int ReplicaRegistry::members() const {
  absl::MutexLock lock(&mu_);
  return separate_ ? static_cast<int>(live_locked().size()) : expected_;
}

int64_t ReplicaRegistry::generation() const {
  absl::MutexLock lock(&mu_);
  return generation_;
}

absl::StatusOr<std::vector<lathe::v1::TaskResult>> ReplicaRegistry::RunOnAll(std::vector<lathe::v1::Task> tasks,
                                                                             absl::Duration timeout) {
  absl::StatusOr<std::vector<int64_t>> ids = Send(std::move(tasks));
  if (!ids.ok()) return ids.status();
  return Collect(*ids, timeout);
}

absl::StatusOr<std::vector<int64_t>> ReplicaRegistry::Send(std::vector<lathe::v1::Task> tasks) {
  return SendSplit([&](int) { return std::move(tasks); });
}

absl::StatusOr<std::vector<int64_t>> ReplicaRegistry::SendSplit(
    const std::function<std::vector<lathe::v1::Task>(int)>& split) {
  absl::MutexLock lock(&mu_);
  if (state_ != DeploymentState::kServing) {
    return absl::UnavailableError(absl::StrCat("the deployment is not serving: ", detail_locked()));
  }
  std::vector<int> to;
  if (separate_) {
    to = live_locked();
  } else {
    for (int i = 0; i < expected_; ++i) to.push_back(i);
  }
  std::vector<lathe::v1::Task> tasks = split(static_cast<int>(to.size()));
  if (tasks.size() != to.size()) {
    return absl::InternalError(absl::StrCat(tasks.size(), " tasks for ", to.size(), " replicas"));
  }
  std::vector<int64_t> ids;
  for (size_t k = 0; k < to.size(); ++k) {
    if (tasks[k].op().op_case() == lathe::v1::SubmitRequest::OP_NOT_SET) {
      ids.push_back(-1);
      continue;
    }
    tasks[k].set_task_id(next_task_id_++);
    ids.push_back(tasks[k].task_id());
    if (separate_) {
      SetMembership(tasks[k], static_cast<int>(k), static_cast<int>(to.size()));
      owner_[tasks[k].task_id()] = to[k];
    }
    lathe::v1::CoordinatorMessage message;
    *message.mutable_task() = std::move(tasks[k]);
    // A failed send shows up as the replica's disconnection.
    replicas_[to[k]].sink->Send(message);
  }
  return ids;
}

absl::StatusOr<std::vector<lathe::v1::TaskResult>> ReplicaRegistry::Collect(const std::vector<int64_t>& ids,
                                                                            absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto done = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    if (state_ != DeploymentState::kServing) return true;
    for (int64_t id : ids) {
      if (id >= 0 && answers_.count(id) == 0) return false;
    }
    return true;
  };
  const bool in_time = mu_.AwaitWithTimeout(absl::Condition(&done), timeout);
  std::vector<lathe::v1::TaskResult> out;
  for (int64_t id : ids) {
    if (id < 0) {
      out.emplace_back().set_task_id(id);
      continue;
    }
    auto it = answers_.find(id);
    if (it != answers_.end()) out.push_back(std::move(it->second)), answers_.erase(it);
  }
  if (out.size() == ids.size()) return out;
  if (state_ != DeploymentState::kServing) return absl::UnavailableError(detail_locked());
  if (!in_time) return absl::DeadlineExceededError(absl::StrCat("replicas did not answer within ", absl::FormatDuration(timeout)));
  return absl::InternalError("replica answers missing");
}

int ReplicaRegistry::AwaitAnswered(const std::vector<std::vector<int64_t>>& sets, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  int found = -1;
  const int64_t seen = delivered_;
  auto any = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    for (size_t i = 0; i < sets.size(); ++i) {
      bool all = true;
      for (int64_t id : sets[i]) all = all && (id < 0 || answers_.count(id) > 0);
      if (all || state_ != DeploymentState::kServing) {
        found = static_cast<int>(i);
        return true;
      }
    }
    return delivered_ != seen;  // another answer: the caller's sets may have changed
  };
  mu_.AwaitWithTimeout(absl::Condition(&any), timeout);
  return found;
}

std::optional<lathe::v1::TaskResult> ReplicaRegistry::Kept(int replica, const std::string& op_id) const {
  absl::MutexLock lock(&mu_);
  if (replica < 0 || replica >= expected_) return std::nullopt;
  auto it = replicas_[replica].kept.find(op_id);
  if (it == replicas_[replica].kept.end()) return std::nullopt;
  return it->second;
}

void ReplicaRegistry::ForgetKept() {
  absl::MutexLock lock(&mu_);
  for (Replica& slot : replicas_) slot.kept.clear();
}

void ReplicaRegistry::Shutdown(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (state_ != DeploymentState::kLost) state_ = DeploymentState::kShuttingDown;
  if (lost_reason_.empty()) lost_reason_ = reason;
  lathe::v1::CoordinatorMessage message;
  message.mutable_shutdown()->set_reason(reason);
  for (Replica& slot : replicas_) {
    if (slot.sink != nullptr) slot.sink->Send(message);
  }
}

void ReplicaRegistry::OnLost(std::function<void(const std::string&)> callback) {
  absl::MutexLock lock(&mu_);
  on_lost_ = std::move(callback);
}

DeploymentState ReplicaRegistry::state() const {
  absl::MutexLock lock(&mu_);
  return state_;
}

std::string ReplicaRegistry::detail() const {
  absl::MutexLock lock(&mu_);
  return detail_locked();
}

std::string ReplicaRegistry::detail_locked() const {
  if (!lost_reason_.empty()) return lost_reason_;
  if (state_ == DeploymentState::kServing && !left_.empty()) return left_;
  std::vector<int> missing;
  for (int i = 0; i < expected_; ++i) {
    if (replicas_[i].sink == nullptr) missing.push_back(i);
  }
  if (missing.empty()) return "every replica registered";
  return absl::StrCat("waiting for replica(s) ", absl::StrJoin(missing, ", "));
}

int ReplicaRegistry::registered() const {
  absl::MutexLock lock(&mu_);
  return registered_locked();
}

int ReplicaRegistry::registered_locked() const {
  int n = 0;
  for (const Replica& slot : replicas_) n += slot.sink != nullptr;
  return n;
}

lathe::v1::ModelSummary ReplicaRegistry::model() const {
  absl::MutexLock lock(&mu_);
  return model_;
}

std::vector<ReplicaRegistry::ReplicaStatus> ReplicaRegistry::Statuses() const {
  absl::MutexLock lock(&mu_);
  std::vector<ReplicaStatus> out;
  const absl::Time now = clock_->Now();
  for (int i = 0; i < expected_; ++i) {
    const Replica& slot = replicas_[i];
    ReplicaStatus s;
    s.replica = i;
    s.registered = slot.sink != nullptr;
    s.connected = slot.connected;
    if (slot.heard) s.heartbeat_age = now - slot.last_heard;
    s.host = slot.host;
    s.pid = slot.pid;
    out.push_back(std::move(s));
  }
  return out;
}

lathe::v1::Layout ReplicaRegistry::layout() const {
  absl::MutexLock lock(&mu_);
  return layout_;
}

}  // namespace lathe::coordinator
