// What the coordinator measures for its operator (docs/operations.md): per
// run the step, step time, tokens/s, an MFU estimate, loss, grad norm and
// learning rate, taken from the operations' own results; op latencies per op
// type; sampling requests in flight and their batch sizes; checkpoint bytes
// written and read. Fed by the dispatcher (OpObserver), rendered with the
// deployment's live state by OpsView. Thread-safe.
#ifndef LATHE_COORDINATOR_OPS_METRICS_H_
#define LATHE_COORDINATOR_OPS_METRICS_H_

#include <map>
#include <optional>
#include <set>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/dispatcher.h"
#include "coordinator/prometheus_text.h"
#include "coordinator/replica_registry.h"
#include "coordinator/run_history.h"

namespace lathe::coordinator {

// The op type of a request: the name of its `op` field ("forward_backward", …).
std::string OpType(const lathe::v1::SubmitRequest& request);

// Model FLOPs of one forward_backward (docs/operations.md, "MFU"):
// 6·N·T + 6·L·q·Σn², N active parameters, T tokens, L softmax-attention
// layers of query width q, n each datum's length; a forward is a third of it.
double TrainingFlops(const lathe::v1::ModelSummary& model, const lathe::v1::ForwardBackwardInput& batch, bool forward_only);

class OpsMetrics : public OpObserver {
 public:
  // None owned; all outlive this. `store`: null without a checkpoint root.
  // `peak_flops_per_device`: the MFU denominator per device; 0: no MFU.
  OpsMetrics(const ReplicaRegistry* registry, const CheckpointStore* store, const RunHistory* history,
             double peak_flops_per_device);

  void Sent(const ReadyOp& op, absl::Time at) override;
  void Finished(const ReadyOp& op, const lathe::v1::OpResult* result, absl::Time sent, absl::Time now,
                const std::optional<lathe::v1::RunInfo>& run) override;

  // Appends this object's families to `out`; `runs`: the live runs (their
  // step and policy version come from the dispatcher's entries).
  void Render(const std::vector<lathe::v1::RunInfo>& runs, PrometheusText& out) const;

  // Seeds a run's latest values (loss, grad norm, learning rate, step time,
  // tokens/s, MFU) from the end of its history: a restarted coordinator shows
  // them before the run's next step.
  void Resume(const std::string& run_id, const std::vector<nlohmann::json>& lines);

  // A run's latest values as JSON for the page (empty object: none yet).
  nlohmann::json RunJson(const std::string& run_id) const;

 private:
  struct RunStats {
    double loss_sum = NAN, loss_tokens = NAN, grad_norm = NAN, learning_rate = NAN;
    double step_seconds = NAN, tokens_per_second = NAN, mfu = NAN;
    double tokens_total = 0;
    // The current step: tokens and FLOPs of its forward(_backward)s, when
    // its first one was sent.
    double step_tokens = 0, step_flops = 0;
    std::optional<absl::Time> step_first_sent;
    std::optional<absl::Time> last_optim;  // when the previous optim_step finished
  };
  struct OpStats {
    Histogram latency;
    double done = 0, failed = 0;
  };
  // The line the run's history gets (null when the op keeps none).
  nlohmann::json TrainingLocked(const ReadyOp& op, const lathe::v1::OpResult& result, absl::Time sent, absl::Time now,
                                int64_t step) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CheckpointBytes(const lathe::v1::OpResult& result, const std::string& run_id);

  const ReplicaRegistry* registry_;
  const CheckpointStore* store_;
  const RunHistory* history_;
  const double peak_flops_per_device_;
  mutable absl::Mutex mu_;
  std::map<std::string, RunStats> runs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, OpStats> ops_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> sampling_out_ ABSL_GUARDED_BY(mu_);  // op ids sent, not yet recorded
  Histogram sampling_batch_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, double> checkpoint_written_ ABSL_GUARDED_BY(mu_);  // by kind
  std::map<std::string, double> checkpoint_read_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_OPS_METRICS_H_
