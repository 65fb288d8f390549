// Control messages inside a replica: a header {kind, byte length} then the
// serialized task packed in int64 words, broadcast from the leader.
#include "dp_worker/replica_loop.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/status.h"

namespace lathe::dp_worker {
namespace {

enum Kind : int64_t { kKeepalive = 0, kTask = 1, kStop = 2 };

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

}  // namespace

absl::Status RunLeader(ReplicaLink& link, OpExecutor& executor, parallel::Communicator& replica,
                       const std::atomic<bool>& stop, const LoopOptions& options) {
  while (!stop.load() && !link.closed()) {
    std::optional<lathe::v1::Task> task = link.NextTask(options.idle_tick);
    if (!task.has_value()) {
      LATHE_RETURN_IF_ERROR(SendControl(replica, kKeepalive, "", options.control_timeout));
      continue;
    }
    LATHE_RETURN_IF_ERROR(SendControl(replica, kTask, task->SerializeAsString(), options.control_timeout));
    const lathe::v1::TaskResult answer = executor.Execute(*task);
    link.SendResult(answer);
    if (parallel::CommunicationBroken()) {
      link.Deregister(answer.error().message());
      return absl::UnavailableError(answer.error().message());
    }
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
    if (control.first != kTask) continue;
    lathe::v1::Task task;
    if (!task.ParseFromString(control.second)) return absl::InternalError("unreadable task from the replica leader");
    const lathe::v1::TaskResult answer = executor.Execute(task);
    if (parallel::CommunicationBroken()) return absl::UnavailableError(answer.error().message());
  }
}

}  // namespace lathe::dp_worker
