// The operator's measurements, from the operations' own results.
#include "coordinator/ops_metrics.h"

#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "core/log.h"

namespace lathe::coordinator {
namespace {

using nlohmann::json;

std::vector<double> LatencyBounds() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 7200};
}

double Metric(const google::protobuf::Map<std::string, double>& metrics, const std::string& name) {
  auto it = metrics.find(name);
  return it == metrics.end() ? NAN : it->second;
}

json MetricsJson(const google::protobuf::Map<std::string, double>& metrics) {
  json out = json::object();
  for (const auto& [name, value] : metrics) {
    if (std::isfinite(value)) out[name] = value;  // JSON has no NaN or infinity
  }
  return out;
}

// The run a lathe://<run>/<kind>/<name> path belongs to, and its kind.
std::pair<std::string, std::string> RunAndKind(absl::string_view path) {
  if (!absl::ConsumePrefix(&path, "lathe://")) return {};
  const size_t slash = path.find('/');
  if (slash == absl::string_view::npos) return {};
  const absl::string_view rest = path.substr(slash + 1);
  return {std::string(path.substr(0, slash)), std::string(rest.substr(0, rest.find('/')))};
}

void SetIfFinite(json& line, const char* key, double value) {
  if (std::isfinite(value)) line[key] = value;
}

}  // namespace

std::string OpType(const lathe::v1::SubmitRequest& request) {
  const auto* field = lathe::v1::SubmitRequest::descriptor()->FindFieldByNumber(request.op_case());
  return field == nullptr ? "none" : field->name();
}

double TrainingFlops(const lathe::v1::ModelSummary& model, const lathe::v1::ForwardBackwardInput& batch,
                     bool forward_only) {
  double tokens = 0, squares = 0;
  for (const lathe::v1::Datum& datum : batch.data()) {
    double n = 0;
    for (const lathe::v1::ModelInputChunk& chunk : datum.model_input().chunks()) {
      n += static_cast<double>(chunk.encoded_text().tokens().size() / 4);
    }
    tokens += n;
    squares += n * n;
  }
  const double flops = 6.0 * static_cast<double>(model.active_parameters()) * tokens +
                       6.0 * static_cast<double>(model.attention_layers()) *
                           static_cast<double>(model.attention_q_dim()) * squares;
  return forward_only ? flops / 3 : flops;
}

OpsMetrics::OpsMetrics(const ReplicaRegistry* registry, const CheckpointStore* store, const RunHistory* history,
                       double peak_flops_per_device)
    : registry_(registry),
      store_(store),
      history_(history),
      peak_flops_per_device_(peak_flops_per_device),
      sampling_batch_({1, 2, 4, 8, 16, 32, 64, 128, 256}) {}

void OpsMetrics::Sent(const ReadyOp& op, absl::Time at) {
  const auto kind = op.request.op_case();
  absl::MutexLock lock(&mu_);
  if (kind == lathe::v1::SubmitRequest::kSample || kind == lathe::v1::SubmitRequest::kComputeLogprobs) {
    sampling_out_.insert(op.op_id);
  } else if (kind == lathe::v1::SubmitRequest::kForward || kind == lathe::v1::SubmitRequest::kForwardBackward) {
    RunStats& run = runs_[op.request.run_id()];
    if (!run.step_first_sent.has_value()) run.step_first_sent = at;
  }
}

void OpsMetrics::Finished(const ReadyOp& op, const lathe::v1::OpResult* result, absl::Time sent, absl::Time now,
                          const std::optional<lathe::v1::RunInfo>& run) {
  const std::string type = OpType(op.request);
  const auto kind = op.request.op_case();
  json line;
  {
    absl::MutexLock lock(&mu_);
    auto it = ops_.try_emplace(type, OpStats{Histogram(LatencyBounds())}).first;
    (result != nullptr ? it->second.done : it->second.failed) += 1;
    it->second.latency.Observe(std::max(0.0, absl::ToDoubleSeconds(now - sent)));
    if (kind == lathe::v1::SubmitRequest::kSample || kind == lathe::v1::SubmitRequest::kComputeLogprobs) {
      sampling_out_.erase(op.op_id);
      if (result != nullptr && result->has_sample()) {
        sampling_batch_.Observe(std::max(1, result->sample().batched_requests()));
      }
    }
    if (result == nullptr) return;
    line = TrainingLocked(op, *result, sent, now, run.has_value() ? run->step() : -1);
  }
  CheckpointBytes(*result, op.request.run_id());
  if (!line.is_null() && history_ != nullptr && history_->enabled()) {
    if (absl::Status s = history_->Append(op.request.run_id(), line); !s.ok()) {
      LATHE_LOG(Warning, "run history: %s", s.message());
    }
  }
}

json OpsMetrics::TrainingLocked(const ReadyOp& op, const lathe::v1::OpResult& result, absl::Time sent, absl::Time now,
                                int64_t step) {
  const std::string& run_id = op.request.run_id();
  if (result.has_init()) {
    // Step and optimizer start over. A forward_backward sent after the init
    // (pipelined behind it) already began the next step.
    RunStats& stats = runs_[run_id];
    const std::optional<absl::Time> begun = stats.step_first_sent;
    stats = RunStats();
    if (begun.has_value() && *begun >= sent) stats.step_first_sent = begun;
    return nullptr;
  }
  if (result.has_delete_run()) {
    runs_.erase(run_id);
    return nullptr;
  }
  json line = {{"op_id", op.op_id}, {"seq_id", op.request.seq_id()}, {"type", OpType(op.request)},
               {"step", step}, {"unix_ms", absl::ToUnixMillis(now)},
               {"duration_s", absl::ToDoubleSeconds(now - sent)}};
  RunStats& run = runs_[run_id];
  if (result.has_forward_backward()) {
    const auto& metrics = result.forward_backward().metrics();
    const bool forward_only = op.request.has_forward();
    const lathe::v1::ForwardBackwardInput& batch = forward_only ? op.request.forward() : op.request.forward_backward();
    double tokens = Metric(metrics, "num_tokens:sum");
    if (!std::isfinite(tokens)) tokens = 0;
    run.tokens_total += tokens;
    run.step_tokens += tokens;
    run.step_flops += TrainingFlops(registry_->model(), batch, forward_only);
    if (!forward_only) {
      run.loss_sum = Metric(metrics, "loss:sum");
      run.loss_tokens = Metric(metrics, "num_loss_tokens:sum");
    }
    line["metrics"] = MetricsJson(metrics);
    return line;
  }
  if (result.has_optim_step()) {
    const auto& metrics = result.optim_step().metrics();
    run.grad_norm = Metric(metrics, "grad_norm:mean");
    run.learning_rate = Metric(metrics, "learning_rate:mean");
    // The step began when its first forward(_backward) went out, or when the
    // previous step ended if that was later (the replicas run ops in order).
    // None went out since then: they were sent (pipelined) before it ended.
    absl::Time start = run.last_optim.value_or(run.step_first_sent.value_or(sent));
    if (run.step_first_sent.has_value()) start = std::max(start, *run.step_first_sent);
    run.step_seconds = absl::ToDoubleSeconds(now - start);
    const lathe::v1::Layout layout = registry_->layout();
    const double devices = static_cast<double>(std::max(1, layout.replicas()) * std::max(1, layout.node_count()) *
                                               std::max(1, layout.devices_per_node()));
    if (run.step_seconds > 0) {
      run.tokens_per_second = run.step_tokens / run.step_seconds;
      run.mfu = peak_flops_per_device_ > 0 && run.step_flops > 0
                    ? run.step_flops / (run.step_seconds * peak_flops_per_device_ * devices)
                    : NAN;
    }
    line["metrics"] = MetricsJson(metrics);
    SetIfFinite(line, "step_seconds", run.step_seconds);
    SetIfFinite(line, "tokens", run.step_tokens);
    SetIfFinite(line, "tokens_per_s", run.tokens_per_second);
    SetIfFinite(line, "mfu", run.mfu);
    run.step_tokens = run.step_flops = 0;
    run.step_first_sent.reset();
    run.last_optim = now;
    return line;
  }
  return nullptr;
}

void OpsMetrics::CheckpointBytes(const lathe::v1::OpResult& result, const std::string& run_id) {
  if (store_ == nullptr) return;
  std::string path;
  bool written = false;
  if (result.has_save_state()) path = result.save_state().path(), written = true;
  else if (result.has_save_weights_for_sampler()) path = result.save_weights_for_sampler().path(), written = true;
  else if (result.has_load_state()) path = result.load_state().path();
  else if (result.has_init()) path = result.init().loaded_from();
  if (path.empty()) return;
  const auto [run, kind] = RunAndKind(path);
  absl::StatusOr<std::vector<lathe::v1::Checkpoint>> listed = store_->List(run.empty() ? run_id : run);
  if (!listed.ok()) return;
  for (const lathe::v1::Checkpoint& c : *listed) {
    if (c.id() != path) continue;
    absl::MutexLock lock(&mu_);
    (written ? checkpoint_written_ : checkpoint_read_)[kind] += static_cast<double>(c.size_bytes());
  }
}

void OpsMetrics::Render(const std::vector<lathe::v1::RunInfo>& runs, PrometheusText& out) const {
  absl::MutexLock lock(&mu_);
  struct Gauge {
    const char* name;
    const char* type;
    const char* help;
    double RunStats::*field;
  };
  const Gauge gauges[] = {
      {"lathe_run_loss_sum", "gauge", "loss:sum of the run's last forward_backward, as it returned it",
       &RunStats::loss_sum},
      {"lathe_run_loss_tokens", "gauge", "num_loss_tokens:sum of the run's last forward_backward",
       &RunStats::loss_tokens},
      {"lathe_run_grad_norm", "gauge", "grad_norm:mean of the run's last optim_step (before clipping)",
       &RunStats::grad_norm},
      {"lathe_run_learning_rate", "gauge", "learning_rate:mean of the run's last optim_step",
       &RunStats::learning_rate},
      {"lathe_run_step_seconds", "gauge",
       "wall time of the run's last step: from its first forward(_backward) sent (or the previous step's end) to "
       "its optim_step recorded",
       &RunStats::step_seconds},
      {"lathe_run_tokens_per_second", "gauge", "num_tokens:sum of the last step's forward(_backward)s / its step time",
       &RunStats::tokens_per_second},
      {"lathe_run_mfu", "gauge",
       "model FLOPs of the last step / (step time x --peak_flops_per_device x devices); docs/operations.md",
       &RunStats::mfu},
      {"lathe_run_tokens_total", "counter", "tokens of every forward(_backward) of the run recorded by this process",
       &RunStats::tokens_total},
  };
  out.Family("lathe_run_step", "gauge", "optimizer steps the run has taken");
  for (const lathe::v1::RunInfo& r : runs) out.Sample("lathe_run_step", {{"run", r.run_id()}}, r.step());
  out.Family("lathe_run_policy_version", "gauge", "sampler weights the run has published");
  for (const lathe::v1::RunInfo& r : runs) out.Sample("lathe_run_policy_version", {{"run", r.run_id()}}, r.policy_version());
  for (const Gauge& g : gauges) {
    out.Family(g.name, g.type, g.help);
    for (const lathe::v1::RunInfo& r : runs) {
      auto it = runs_.find(r.run_id());
      if (it != runs_.end() && std::isfinite(it->second.*g.field)) {
        out.Sample(g.name, {{"run", r.run_id()}}, it->second.*g.field);
      }
    }
  }
  out.Family("lathe_op_duration_seconds", "histogram",
             "operations from dispatch to the replicas until their result was recorded, by op type");
  for (const auto& [type, stats] : ops_) out.HistogramSamples("lathe_op_duration_seconds", {{"op", type}}, stats.latency);
  out.Family("lathe_ops_total", "counter", "operations recorded, by op type and outcome");
  for (const auto& [type, stats] : ops_) {
    out.Sample("lathe_ops_total", {{"op", type}, {"outcome", "done"}}, stats.done);
    out.Sample("lathe_ops_total", {{"op", type}, {"outcome", "failed"}}, stats.failed);
  }
  out.Family("lathe_sampling_requests_in_flight", "gauge", "sample and compute_logprobs requests on the replicas");
  out.Sample("lathe_sampling_requests_in_flight", {}, static_cast<double>(sampling_out_.size()));
  out.Family("lathe_sampling_batch_requests", "histogram",
             "requests each sample request was decoded together with (itself included), as the replica reported");
  out.HistogramSamples("lathe_sampling_batch_requests", {}, sampling_batch_);
  out.Family("lathe_checkpoint_written_bytes_total", "counter",
             "bytes of the checkpoints saved (their committed size on disk), by kind");
  for (const char* kind : {"weights", "sampler_weights"}) {
    auto it = checkpoint_written_.find(kind);
    out.Sample("lathe_checkpoint_written_bytes_total", {{"kind", kind}}, it == checkpoint_written_.end() ? 0 : it->second);
  }
  out.Family("lathe_checkpoint_read_bytes_total", "counter",
             "bytes of the checkpoints loaded (load_state, an init from a checkpoint), by kind");
  for (const char* kind : {"weights", "sampler_weights"}) {
    auto it = checkpoint_read_.find(kind);
    out.Sample("lathe_checkpoint_read_bytes_total", {{"kind", kind}}, it == checkpoint_read_.end() ? 0 : it->second);
  }
}

void OpsMetrics::Resume(const std::string& run_id, const std::vector<json>& lines) {
  auto number = [](const json& j, const char* key) {
    auto it = j.find(key);
    return it != j.end() && it->is_number() ? it->get<double>() : NAN;
  };
  absl::MutexLock lock(&mu_);
  RunStats& run = runs_[run_id];
  for (const json& line : lines) {
    const json metrics = line.value("metrics", json::object());
    if (!metrics.is_object()) continue;
    const std::string type = line.value("type", "");
    if (type == "forward_backward") {
      run.loss_sum = number(metrics, "loss:sum");
      run.loss_tokens = number(metrics, "num_loss_tokens:sum");
    } else if (type == "optim_step") {
      run.grad_norm = number(metrics, "grad_norm:mean");
      run.learning_rate = number(metrics, "learning_rate:mean");
      run.step_seconds = number(line, "step_seconds");
      run.tokens_per_second = number(line, "tokens_per_s");
      run.mfu = number(line, "mfu");
    }
  }
}

json OpsMetrics::RunJson(const std::string& run_id) const {
  absl::MutexLock lock(&mu_);
  json out = json::object();
  auto it = runs_.find(run_id);
  if (it == runs_.end()) return out;
  const RunStats& r = it->second;
  SetIfFinite(out, "loss_sum", r.loss_sum);
  SetIfFinite(out, "loss_tokens", r.loss_tokens);
  SetIfFinite(out, "grad_norm", r.grad_norm);
  SetIfFinite(out, "learning_rate", r.learning_rate);
  SetIfFinite(out, "step_seconds", r.step_seconds);
  SetIfFinite(out, "tokens_per_s", r.tokens_per_second);
  SetIfFinite(out, "mfu", r.mfu);
  return out;
}

}  // namespace lathe::coordinator
