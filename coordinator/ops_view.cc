// /metrics and the page's JSON from the coordinator's live state.
#include "coordinator/ops_view.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "coordinator/checkpoint_files.h"
#include "coordinator/request_limits.h"

namespace lathe::coordinator {
namespace {

using nlohmann::json;

const char* StateName(DeploymentState s) {
  switch (s) {
    case DeploymentState::kStarting: return "starting";
    case DeploymentState::kServing: return "serving";
    case DeploymentState::kLost: return "unavailable";
    case DeploymentState::kShuttingDown: return "shutting_down";
  }
  return "unknown";
}

json LayoutJson(const lathe::v1::Layout& l) {
  return {{"replicas", l.replicas()}, {"node_count", l.node_count()}, {"devices_per_node", l.devices_per_node()},
          {"tp", l.tp()}, {"ep", l.ep()}, {"cp", std::max(1, l.cp())}};
}

double AgeSeconds(absl::Duration d) {
  return d == absl::InfiniteDuration() ? NAN : absl::ToDoubleSeconds(d);
}

}  // namespace

std::string OpsView::MetricsText() const {
  PrometheusText out;
  const DeploymentState state = p_.registry->state();
  out.Family("lathe_deployment_state", "gauge", "1 for the deployment's current state, 0 for the others");
  for (DeploymentState s : {DeploymentState::kStarting, DeploymentState::kServing, DeploymentState::kLost,
                            DeploymentState::kShuttingDown}) {
    out.Sample("lathe_deployment_state", {{"state", StateName(s)}}, s == state ? 1 : 0);
  }
  out.Family("lathe_replicas_expected", "gauge", "replicas the deployment was started for (--replicas)");
  out.Sample("lathe_replicas_expected", {}, p_.registry->expected());
  const std::vector<ReplicaRegistry::ReplicaStatus> replicas = p_.registry->Statuses();
  out.Family("lathe_replica_registered", "gauge", "1 while the replica is registered (and not lost)");
  for (const auto& r : replicas) {
    out.Sample("lathe_replica_registered", {{"replica", std::to_string(r.replica)}, {"host", r.host}}, r.registered);
  }
  out.Family("lathe_replica_connected", "gauge", "1 while the replica leader's stream is open");
  for (const auto& r : replicas) out.Sample("lathe_replica_connected", {{"replica", std::to_string(r.replica)}}, r.connected);
  out.Family("lathe_replica_heartbeat_age_seconds", "gauge",
             "seconds since the replica was last heard from (absent before it first registered)");
  for (const auto& r : replicas) {
    if (double age = AgeSeconds(r.heartbeat_age); std::isfinite(age)) {
      out.Sample("lathe_replica_heartbeat_age_seconds", {{"replica", std::to_string(r.replica)}}, age);
    }
  }
  out.Family("lathe_ledger_unfinished_ops", "gauge", "operations accepted and not yet finished (the queue, --max_queued)");
  out.Sample("lathe_ledger_unfinished_ops", {}, static_cast<double>(p_.ledger->unfinished()));
  const lathe::v1::ModelSummary model = p_.registry->model();
  out.Family("lathe_model_active_parameters", "gauge", "matmul weights one token passes through (the N of 6N)");
  if (model.active_parameters() > 0) out.Sample("lathe_model_active_parameters", {{"model", model.base_model()}}, model.active_parameters());
  out.Family("lathe_peak_flops_per_device", "gauge", "--peak_flops_per_device, the MFU denominator per device");
  out.Sample("lathe_peak_flops_per_device", {}, p_.peak_flops_per_device);
  const std::vector<lathe::v1::RunInfo> runs = p_.dispatcher->Runs();
  out.Family("lathe_runs", "gauge", "runs held (not deleted)");
  out.Sample("lathe_runs", {}, static_cast<double>(runs.size()));
  p_.metrics->Render(runs, out);
  return out.text();
}

json OpsView::Deployment() const {
  const lathe::v1::ModelSummary model = p_.registry->model();
  json replicas = json::array();
  for (const auto& r : p_.registry->Statuses()) {
    const double age = AgeSeconds(r.heartbeat_age);
    replicas.push_back({{"replica", r.replica}, {"registered", r.registered}, {"connected", r.connected},
                        {"host", r.host}, {"pid", r.pid},
                        {"heartbeat_age_s", std::isfinite(age) ? json(age) : json(nullptr)}});
  }
  return {{"model",
           {{"base_model", model.base_model()}, {"architecture", model.architecture()},
            {"vocab_size", model.vocab_size()}, {"max_seq_len", model.max_seq_len()},
            {"active_parameters", model.active_parameters()}}},
          {"layout", LayoutJson(p_.registry->layout())},
          {"state", StateName(p_.registry->state())},
          {"detail", p_.registry->detail()},
          {"replicas", std::move(replicas)},
          {"unfinished_ops", p_.ledger->unfinished()},
          {"peak_flops_per_device", p_.peak_flops_per_device}};
}

json OpsView::Runs() const {
  json out = json::array();
  std::set<std::string> live;
  for (const lathe::v1::RunInfo& r : p_.dispatcher->Runs()) {
    live.insert(r.run_id());
    out.push_back({{"run_id", r.run_id()}, {"state", "live"}, {"step", r.step()},
                   {"policy_version", r.policy_version()}, {"lora_rank", r.lora().rank()},
                   {"created_unix_ms", r.created_unix_ms()}, {"trainable_parameters", r.trainable_parameters()},
                   {"latest", p_.metrics->RunJson(r.run_id())}});
  }
  // Runs this coordinator does not hold (deleted, or of an earlier
  // deployment) whose history is under the checkpoint root.
  for (const std::string& run_id : EndedRuns(live)) {
    out.push_back({{"run_id", run_id}, {"state", "ended"}, {"step", nullptr}, {"policy_version", nullptr},
                   {"lora_rank", nullptr}, {"created_unix_ms", nullptr}, {"trainable_parameters", nullptr},
                   {"latest", json::object()}});
  }
  return out;
}

std::vector<std::string> OpsView::EndedRuns(const std::set<std::string>& live) const {
  std::vector<std::string> out;
  if (p_.history == nullptr || !p_.history->enabled()) return out;
  const std::string& root = p_.history->root();
  std::error_code ec;
  for (std::filesystem::directory_iterator it(root, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (live.count(name) || !ValidateRunId(name).ok() || !IsRealDirectory(it->path())) continue;
    if (!IsRealFile(it->path() / "history.jsonl")) continue;
    out.push_back(name);
    if (out.size() >= kMaxEndedRuns) break;
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<json> OpsView::History(const std::string& run_id) const {
  if (absl::Status s = ValidateRunId(run_id); !s.ok()) return s;
  absl::StatusOr<std::vector<json>> lines = p_.history->Read(run_id);
  if (!lines.ok()) return lines.status();
  return json{{"run_id", run_id}, {"points", *std::move(lines)}};
}

absl::StatusOr<json> OpsView::Checkpoints(const std::string& run_id) const {
  if (absl::Status s = ValidateRunId(run_id); !s.ok()) return s;
  if (p_.store == nullptr) return absl::FailedPreconditionError("the coordinator has no --checkpoint_root");
  absl::StatusOr<std::vector<lathe::v1::Checkpoint>> listed = p_.store->List(run_id);
  if (!listed.ok()) return listed.status();
  json out = json::array();
  for (const lathe::v1::Checkpoint& c : *listed) {
    json files = json::array();
    lathe::v1::GetCheckpointFilesRequest request;
    request.set_checkpoint_id(c.id());
    request.set_page_size(1000);
    for (int page = 0; page < 100; ++page) {  // at most 100,000 files listed
      absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> got = p_.store->Files(request);
      if (!got.ok()) break;
      for (const lathe::v1::CheckpointFile& f : got->files()) {
        files.push_back({{"name", f.relative_file_name()}, {"node_rank", f.node_rank()}, {"size_bytes", f.size_bytes()}});
      }
      if (got->next_page_token().empty()) break;
      request.set_page_token(got->next_page_token());
    }
    out.push_back({{"id", c.id()}, {"type", c.type()}, {"size_bytes", c.size_bytes()},
                   {"created_unix_ms", c.created_unix_ms()}, {"expires_unix_ms", c.expires_unix_ms()},
                   {"files", std::move(files)}});
  }
  return json{{"run_id", run_id}, {"checkpoints", std::move(out)}};
}

}  // namespace lathe::coordinator
