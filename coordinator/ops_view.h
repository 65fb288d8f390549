// The operator's view of a deployment, assembled from the coordinator's
// parts: the Prometheus text of /metrics and the JSON behind the operator's
// page (docs/operations.md). Read-only; thread-safe.
#ifndef LATHE_COORDINATOR_OPS_VIEW_H_
#define LATHE_COORDINATOR_OPS_VIEW_H_

#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/dispatcher.h"
#include "coordinator/op_ledger.h"
#include "coordinator/ops_metrics.h"
#include "coordinator/replica_registry.h"
#include "coordinator/run_history.h"
#include "nlohmann/json.hpp"

namespace lathe::coordinator {

struct OpsViewParts {
  const OpLedger* ledger = nullptr;
  const ReplicaRegistry* registry = nullptr;
  const Dispatcher* dispatcher = nullptr;
  const OpsMetrics* metrics = nullptr;
  const RunHistory* history = nullptr;
  const CheckpointStore* store = nullptr;  // null: no checkpoint root
  double peak_flops_per_device = 0;
};

class OpsView {
 public:
  explicit OpsView(OpsViewParts parts) : p_(parts) {}
  // The whole exposition (text format 0.0.4).
  std::string MetricsText() const;
  // {model, layout, state, detail, replicas[], unfinished_ops, peak_flops_per_device}.
  nlohmann::json Deployment() const;
  // [{run_id, state, step, policy_version, lora_rank, created_unix_ms,
  // latest: {...}}]: the live runs (state "live"), then up to kMaxEndedRuns
  // runs with a history under the checkpoint root that this coordinator
  // does not hold (state "ended"; their other fields null).
  nlohmann::json Runs() const;
  static constexpr size_t kMaxEndedRuns = 1000;
  // {run_id, points: [history lines]}. InvalidArgument for a bad run id;
  // NotFound when it has no history.
  absl::StatusOr<nlohmann::json> History(const std::string& run_id) const;
  // {run_id, checkpoints: [{id, type, size_bytes, created_unix_ms,
  // expires_unix_ms, files: [{name, size_bytes, node_rank}]}]}.
  // FailedPrecondition without a checkpoint root; InvalidArgument for a bad run id.
  absl::StatusOr<nlohmann::json> Checkpoints(const std::string& run_id) const;

 private:
  std::vector<std::string> EndedRuns(const std::set<std::string>& live) const;
  OpsViewParts p_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_OPS_VIEW_H_
