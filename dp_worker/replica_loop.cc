// Control messages inside a replica: a header {kind, byte length} then the
// serialized TaskBatch packed in int64 words, broadcast from the leader.
#include "dp_worker/replica_loop.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace lathe::dp_worker {
namespace {

enum Kind : int64_t { kKeepalive = 0, kTasks = 1, kStop = 2 };

absl::Status SendControl(parallel::Communicator& replica, Kind kind, const std::string& bytes,
                         absl::Duration timeout) {
  int64_t header[2] = {kind, static_cast<int64_t>(bytes.size())};
  LATHE_RETURN_IF_ERROR(replica.Broadcast({header, 2, parallel::ElemType::kInt64}, 0, timeout));
  if (bytes.empty()) return absl::OkStatus();
  std::vector<int64_t> words((bytes.size() + 7) / 8, 0);
  std::memcpy(words.data(), bytes.data(), bytes.size());
  return replica.Broadcast({words.data(), static_cast<int64_t>(words.size()), parallel::ElemType::kInt64}, 0,
                           timeout);
}

absl::StatusOr<std::pair<Kind, std::string>> ReceiveControl(parallel::Communicator& replica,
                                                            absl::Duration timeout) {
  int64_t header[2] = {0, 0};
  LATHE_RETURN_IF_ERROR(replica.Broadcast({header, 2, parallel::ElemType::kInt64}, 0, timeout));
  std::string bytes;
  if (header[1] > 0) {
    std::vector<int64_t> words((header[1] + 7) / 8);
    LATHE_RETURN_IF_ERROR(replica.Broadcast(
        {words.data(), static_cast<int64_t>(words.size()), parallel::ElemType::kInt64}, 0, timeout));
    bytes.assign(reinterpret_cast<const char*>(words.data()), header[1]);
  }
  return std::make_pair(static_cast<Kind>(header[0]), std::move(bytes));
}

// Moves the sampling tasks of `key` queued on the link into `batch` while
// the samples fit in `max_rows` (`rows` already taken), waiting up to `wait`
// for each next one. The first task that cannot join goes to `held` and ends
// the drain, so tasks keep their order.
void Drain(ReplicaLink& link, const std::string& key, int rows, int max_rows, absl::Duration wait,
           std::optional<lathe::v1::Task>& held, lathe::v1::TaskBatch& batch) {
  while (!held.has_value() && rows < max_rows) {
    std::optional<lathe::v1::Task> next = link.NextTask(wait);
    if (!next.has_value()) return;
    const int more = next->op().sample().num_samples();
    if (SampleBatchKey(next->op()) != key || rows + more > max_rows) {
      held = std::move(next);
      return;
    }
    rows += more;
    *batch.add_tasks() = *std::move(next);
  }
}

// The next batch: `first`, then, for a sampling task, those of its key that
// arrive within `window` of each other (a burst).
lathe::v1::TaskBatch NextBatch(lathe::v1::Task first, ReplicaLink& link, std::optional<lathe::v1::Task>& held,
                               int max_rows, absl::Duration window) {
  lathe::v1::TaskBatch batch;
  const std::optional<std::string> key = SampleBatchKey(first.op());
  const int rows = key.has_value() ? first.op().sample().num_samples() : 0;
  *batch.add_tasks() = std::move(first);
  if (key.has_value()) Drain(link, *key, rows, max_rows, window, held, batch);
  return batch;
}

// The tasks that join a running decode of `key` now (those already queued),
// sent to the other ranks, also when there are none, so that every rank adds
// the same tasks at the same step.
std::vector<lathe::v1::Task> Joining(ReplicaLink& link, const std::string& key, int decoding, int max_rows,
                                     std::optional<lathe::v1::Task>& held, parallel::Communicator& replica,
                                     absl::Duration timeout, absl::Status& failed) {
  if (!failed.ok()) return {};
  lathe::v1::TaskBatch joining;
  Drain(link, key, decoding, max_rows, absl::ZeroDuration(), held, joining);
  failed = SendControl(replica, kTasks, joining.SerializeAsString(), timeout);
  if (!failed.ok()) return {};
  return {joining.tasks().begin(), joining.tasks().end()};
}

}  // namespace

absl::Status RunLeader(ReplicaLink& link, OpExecutor& executor, parallel::Communicator& replica,
                       const std::atomic<bool>& stop, const LoopOptions& options) {
  std::optional<lathe::v1::Task> held;
  std::optional<absl::Time> stop_by;  // set once a stop is requested (LoopOptions::stop_grace)
  while (held.has_value() || !link.closed()) {
    if (stop.load() && !stop_by.has_value()) stop_by = absl::Now() + options.stop_grace;
    if (stop_by.has_value() && !held.has_value() && absl::Now() >= *stop_by) break;
    std::optional<lathe::v1::Task> task = std::move(held);
    held.reset();
    if (!task.has_value()) {
      task = link.NextTask(stop_by.has_value() ? std::max(absl::ZeroDuration(), *stop_by - absl::Now())
                                               : options.idle_tick);
    }
    if (!task.has_value()) {
      if (!stop_by.has_value()) LATHE_RETURN_IF_ERROR(SendControl(replica, kKeepalive, "", options.control_timeout));
      continue;
    }
    const lathe::v1::TaskBatch batch = NextBatch(*std::move(task), link, held, options.max_sample_rows,
                                                 options.sample_batch_window);
    LATHE_RETURN_IF_ERROR(SendControl(replica, kTasks, batch.SerializeAsString(), options.control_timeout));
    const std::optional<std::string> key = SampleBatchKey(batch.tasks(0).op());
    absl::Status failed;
    OpExecutor::MoreTasks more;
    if (key.has_value()) {
      more = [&](int decoding) {
        return Joining(link, *key, decoding, options.max_sample_rows, held, replica, options.control_timeout, failed);
      };
    }
    std::string why;
    executor.ExecuteBatch(batch, more, [&](const lathe::v1::TaskResult& answer) {
      if (answer.has_error()) why = answer.error().message();
      link.SendResult(answer);
    });
    if (parallel::CommunicationBroken()) {
      link.Deregister(why);
      return absl::UnavailableError(why);
    }
    LATHE_RETURN_IF_ERROR(failed);
  }
  LATHE_RETURN_IF_ERROR(SendControl(replica, kStop, "", options.control_timeout));
  if (!stop.load() && !link.shut_down()) return absl::UnavailableError(link.close_reason());
  link.Deregister(stop.load() ? "stopped by signal" : link.close_reason());
  return absl::OkStatus();
}

absl::Status StopFollowers(parallel::Communicator& replica, const LoopOptions& options) {
  return SendControl(replica, kStop, "", options.control_timeout);
}

absl::Status RunFollower(OpExecutor& executor, parallel::Communicator& replica, const LoopOptions& options) {
  for (;;) {
    LATHE_ASSIGN_OR_RETURN(auto control, ReceiveControl(replica, options.control_timeout));
    if (control.first == kStop) return absl::OkStatus();
    if (control.first != kTasks) continue;
    lathe::v1::TaskBatch batch;
    if (!batch.ParseFromString(control.second) || batch.tasks().empty()) {
      return absl::InternalError("unreadable tasks from the replica leader");
    }
    // Tasks that join a decode come from the leader after every step.
    absl::Status failed;
    OpExecutor::MoreTasks more = [&](int) -> std::vector<lathe::v1::Task> {
      if (!failed.ok()) return {};
      absl::StatusOr<std::pair<Kind, std::string>> joining = ReceiveControl(replica, options.control_timeout);
      lathe::v1::TaskBatch tasks;
      if (!joining.ok()) {
        failed = joining.status();
      } else if (joining->first != kTasks || !tasks.ParseFromString(joining->second)) {
        failed = absl::InternalError("unreadable joining tasks from the replica leader");
      }
      return {tasks.tasks().begin(), tasks.tasks().end()};
    };
    std::string why;
    executor.ExecuteBatch(batch, more, [&](const lathe::v1::TaskResult& answer) {
      if (answer.has_error()) why = answer.error().message();
    });
    if (parallel::CommunicationBroken()) return absl::UnavailableError(why);
    LATHE_RETURN_IF_ERROR(failed);
  }
}

}  // namespace lathe::dp_worker
