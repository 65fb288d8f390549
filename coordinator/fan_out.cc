// Batch splitting over replicas and merging of their answers.
#include "coordinator/fan_out.h"

#include "absl/strings/str_cat.h"
#include "parallel/data_parallel.h"
#include "core/validation.h"

namespace lathe::coordinator {
namespace {

const lathe::v1::ForwardBackwardInput* BatchOf(const lathe::v1::SubmitRequest& op) {
  if (op.op_case() == lathe::v1::SubmitRequest::kForward) return &op.forward();
  if (op.op_case() == lathe::v1::SubmitRequest::kForwardBackward) return &op.forward_backward();
  return nullptr;
}

lathe::v1::ForwardBackwardInput* MutableBatchOf(lathe::v1::SubmitRequest& op) {
  if (op.op_case() == lathe::v1::SubmitRequest::kForward) return op.mutable_forward();
  return op.mutable_forward_backward();
}

}  // namespace

FanOut SplitOp(const lathe::v1::SubmitRequest& op, int replicas) {
  FanOut out;
  if (op.op_case() == lathe::v1::SubmitRequest::kSample || op.op_case() == lathe::v1::SubmitRequest::kComputeLogprobs) {
    out.only = static_cast<int>(op.seq_id() % replicas);
    out.tasks.resize(replicas);  // the others get nothing (no op)
    *out.tasks[out.only].mutable_op() = op;
    return out;
  }
  const lathe::v1::ForwardBackwardInput* batch = BatchOf(op);
  if (batch == nullptr) {
    for (int r = 0; r < replicas; ++r) *out.tasks.emplace_back().mutable_op() = op;
    return out;
  }
  std::vector<int64_t> lengths;
  for (const lathe::v1::Datum& d : batch->data()) {
    lengths.push_back(static_cast<int64_t>(runtime::DatumTokens(d)->size()));
  }
  const std::vector<int> shard_of = parallel::SplitByTokens(lengths, replicas);
  out.datums.resize(replicas);
  for (int r = 0; r < replicas; ++r) {
    lathe::v1::SubmitRequest part = op;
    MutableBatchOf(part)->clear_data();
    *out.tasks.emplace_back().mutable_op() = std::move(part);
  }
  for (int i = 0; i < batch->data_size(); ++i) {
    out.datums[shard_of[i]].push_back(i);
    *MutableBatchOf(*out.tasks[shard_of[i]].mutable_op())->add_data() = batch->data(i);
  }
  return out;
}

absl::StatusOr<lathe::v1::OpResult> MergeAnswers(const lathe::v1::SubmitRequest& op, const FanOut& fan_out,
                                                 const std::vector<lathe::v1::TaskResult>& answers,
                                                 lathe::v1::OpError* error) {
  // A user error first; then a replica lost (UNAVAILABLE), which explains
  // the other replicas' failed collectives.
  auto rank = [](const lathe::v1::OpError& e) {
    if (e.category() == lathe::v1::OpError::USER) return 2;
    return e.code() == static_cast<int>(absl::StatusCode::kUnavailable) ? 1 : 0;
  };
  const lathe::v1::TaskResult* failed = nullptr;
  for (const lathe::v1::TaskResult& a : answers) {
    if (!a.has_error()) continue;
    if (failed == nullptr || rank(a.error()) > rank(failed->error())) failed = &a;
  }
  if (failed != nullptr) {
    *error = failed->error();
    return lathe::v1::OpResult();
  }
  if (fan_out.only >= 0) return answers.at(fan_out.only).result();
  if (BatchOf(op) == nullptr) return answers.at(0).result();
  const int n = BatchOf(op)->data_size();
  lathe::v1::OpResult merged;
  lathe::v1::ForwardBackwardOutput* out = merged.mutable_forward_backward();
  std::vector<const lathe::v1::LossFnOutput*> by_datum(n, nullptr);
  std::vector<const google::protobuf::Map<std::string, double>*> metrics;
  for (size_t r = 0; r < answers.size(); ++r) {
    const lathe::v1::ForwardBackwardOutput& part = answers[r].result().forward_backward();
    if (part.loss_fn_outputs_size() != static_cast<int>(fan_out.datums[r].size())) {
      return absl::InternalError(absl::StrCat("replica ", r, " answered ", part.loss_fn_outputs_size(),
                                              " outputs for ", fan_out.datums[r].size(), " datums"));
    }
    for (size_t j = 0; j < fan_out.datums[r].size(); ++j) by_datum[fan_out.datums[r][j]] = &part.loss_fn_outputs(j);
    // A replica that ran no datums has nothing to say about means or extremes.
    if (!fan_out.datums[r].empty()) metrics.push_back(&part.metrics());
    if (out->loss_fn_output_type().empty()) out->set_loss_fn_output_type(part.loss_fn_output_type());
  }
  for (const lathe::v1::LossFnOutput* o : by_datum) *out->add_loss_fn_outputs() = *o;
  if (absl::Status s = parallel::MergeMetrics(metrics, out->mutable_metrics()); !s.ok()) return s;
  return merged;
}

}  // namespace lathe::coordinator
