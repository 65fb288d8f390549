// Request handling shared by the coordinator's doors: checks, then the ledger.
#include "coordinator/front_end.h"


#include "absl/strings/str_cat.h"
#include "google/protobuf/util/message_differencer.h"
#include "coordinator/op_validation.h"
#include "coordinator/request_limits.h"
#include "core/checkpoint_path.h"
#include "core/quote.h"
#include "core/random_id.h"
#include "core/status.h"

namespace lathe::coordinator {
namespace {

using runtime::QuoteForMessage;

// A sample or compute_logprobs of a sampler checkpoint or the base model
// (after ResolveWeights turned a policy_version into its path).
bool ReadsPinnedWeights(const lathe::v1::SubmitRequest& op) {
  if (op.has_sample()) return !op.sample().model_path().empty() || op.sample().base();
  if (op.has_compute_logprobs()) return !op.compute_logprobs().model_path().empty() || op.compute_logprobs().base();
  return false;
}

}  // namespace

FrontEnd::FrontEnd(ServiceOptions options, const ApiKeys* keys, OpLedger* ledger, ReplicaRegistry* registry,
                   Dispatcher* dispatcher)
    : options_(options), keys_(keys), ledger_(ledger), registry_(registry), dispatcher_(dispatcher),
      store_(options.checkpoint_root) {}

absl::Status FrontEnd::Authorize(absl::string_view authorization) const {
  return keys_->CheckAuthorization(authorization);
}

absl::Status FrontEnd::Serving() const {
  switch (registry_->state()) {
    case DeploymentState::kServing:
      return absl::OkStatus();
    case DeploymentState::kStarting:
      return absl::UnavailableError("the deployment is starting: " + registry_->detail());
    case DeploymentState::kLost:
      return absl::UnavailableError("the deployment lost a replica: " + registry_->detail());
    case DeploymentState::kShuttingDown:
      return absl::UnavailableError("the deployment is shutting down");
  }
  return absl::UnavailableError("unknown state");
}

absl::Status FrontEnd::GetCapabilities(absl::string_view authorization, lathe::v1::Capabilities* response) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  const lathe::v1::ModelSummary model = registry_->model();
  if (!model.base_model().empty()) response->add_base_models(model.base_model());
  response->set_max_seq_len(model.max_seq_len());
  *response->mutable_layout() = registry_->layout();
  response->mutable_layout()->set_replicas(registry_->expected());
  response->set_architecture(model.architecture());
  response->set_vocab_size(model.vocab_size());
  for (const lathe::v1::ModelPreset& p : options_.presets) *response->add_presets() = p;
  return absl::OkStatus();
}

void FrontEnd::Health(lathe::v1::HealthResponse* response) const {
  using H = lathe::v1::HealthResponse;
  switch (registry_->state()) {
    case DeploymentState::kStarting: response->set_state(H::STARTING); break;
    case DeploymentState::kServing: response->set_state(H::SERVING); break;
    case DeploymentState::kLost: response->set_state(H::UNAVAILABLE); break;
    case DeploymentState::kShuttingDown: response->set_state(H::SHUTTING_DOWN); break;
  }
  response->set_replicas_registered(registry_->registered());
  response->set_replicas_expected(registry_->expected());
  response->set_detail(registry_->detail());
}

absl::Status FrontEnd::GetInfo(absl::string_view authorization, const lathe::v1::GetInfoRequest& request,
                               lathe::v1::RunInfo* response) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  LATHE_RETURN_IF_ERROR(ValidateRunId(request.run_id()));
  std::optional<lathe::v1::RunInfo> info = dispatcher_->Run(request.run_id());
  if (!info.has_value()) return absl::NotFoundError("no run " + QuoteForMessage(request.run_id()));
  *response = *info;
  return absl::OkStatus();
}

absl::Status FrontEnd::ListRuns(absl::string_view authorization, std::vector<lathe::v1::RunInfo>* runs) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  *runs = dispatcher_->Runs();
  return absl::OkStatus();
}

absl::Status FrontEnd::CreateRun(absl::string_view authorization, const lathe::v1::CreateRunRequest& request,
                                 lathe::v1::CreateRunResponse* response) {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  LATHE_RETURN_IF_ERROR(Serving());
  LATHE_RETURN_IF_ERROR(ValidateBaseModel(request.base_model()));
  if (!request.run_id().empty()) LATHE_RETURN_IF_ERROR(ValidateRunId(request.run_id()));
  const lathe::v1::ModelSummary model = registry_->model();
  if (!request.base_model().empty() && request.base_model() != model.base_model()) {
    return absl::InvalidArgumentError(
        absl::StrCat("this deployment serves ", model.base_model(), ", not ", QuoteForMessage(request.base_model())));
  }
  lathe::v1::SubmitRequest init;
  if (request.load_path().empty()) {
    LATHE_RETURN_IF_ERROR(ValidateLora(request.lora(), model));
    *init.mutable_init()->mutable_lora() = request.lora();
  } else {
    if (request.has_lora()) {
      return absl::InvalidArgumentError("a run created from a checkpoint takes its LoRA config: leave lora unset");
    }
    LATHE_RETURN_IF_ERROR(runtime::ParseCheckpointPath(request.load_path()).status());
    if (!options_.checkpoint_root.empty()) {
      lathe::v1::GetCheckpointFilesRequest probe;
      probe.set_checkpoint_id(request.load_path());
      probe.set_page_size(1);
      if (absl::Status s = store_.Files(probe).status(); !s.ok()) {
        return absl::Status(s.code() == absl::StatusCode::kNotFound ? absl::StatusCode::kInvalidArgument : s.code(),
                            absl::StrCat("cannot start from ", QuoteForMessage(request.load_path()), ": ",
                                         s.message()));
      }
    }
    init.mutable_init()->set_load_path(request.load_path());
    init.mutable_init()->set_load_optimizer(request.load_optimizer());
  }
  absl::MutexLock lock(&create_mu_);
  if (!request.run_id().empty() && ledger_->HasRun(request.run_id())) {
    // The same request again (a client's retry) answers the run it made.
    auto it = chosen_.find(request.run_id());
    if (it != chosen_.end() && google::protobuf::util::MessageDifferencer::Equals(it->second.request, request)) {
      response->set_run_id(request.run_id());
      response->set_init_op_id(it->second.init_op_id);
      return absl::OkStatus();
    }
    return absl::AlreadyExistsError(
        absl::StrCat("run ", QuoteForMessage(request.run_id()), " exists (or existed) and was created otherwise"));
  }
  if (dispatcher_->runs() >= options_.max_runs) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this deployment holds at most ", options_.max_runs,
                     " run(s) (--max_runs); re-initialise an existing run with an init operation"));
  }
  const std::string run_id = request.run_id().empty() ? runtime::RandomId("run") : request.run_id();
  lathe::v1::RunInfo info;
  info.set_run_id(run_id);
  info.set_base_model(model.base_model());
  *info.mutable_lora() = request.lora();
  info.set_created_unix_ms(absl::ToUnixMillis(absl::Now()));
  lathe::v1::JournalRun state;
  state.set_run_id(run_id);
  *state.mutable_info() = info;
  if (!request.run_id().empty()) {
    state.set_chosen(true);
    *state.mutable_create_request() = request;
  }
  LATHE_RETURN_IF_ERROR(ledger_->OpenRun(run_id, 0, state));  // journaled first
  dispatcher_->AddRun(info);
  init.set_run_id(run_id);
  LATHE_ASSIGN_OR_RETURN(std::string op_id, ledger_->SubmitInternal(init));
  if (!request.run_id().empty()) chosen_[run_id] = {request, op_id};
  response->set_run_id(run_id);
  response->set_init_op_id(op_id);
  return absl::OkStatus();
}

void FrontEnd::RestoreRun(const lathe::v1::JournalRun& run) {
  if (!run.chosen()) return;
  absl::MutexLock lock(&create_mu_);
  chosen_[run.run_id()] = {run.create_request(), run.run_id() + "/0"};
}

absl::StatusOr<lathe::v1::SubmitRequest> FrontEnd::Admit(absl::string_view authorization,
                                                          const lathe::v1::SubmitRequest& request) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  LATHE_RETURN_IF_ERROR(Serving());
  LATHE_RETURN_IF_ERROR(ValidateRunId(request.run_id()));
  LATHE_RETURN_IF_ERROR(ValidateOp(request, registry_->model()));
  lathe::v1::SubmitRequest op = request;
  LATHE_RETURN_IF_ERROR(ResolveWeights(op));
  return op;
}

absl::Status FrontEnd::Submit(absl::string_view authorization, const lathe::v1::SubmitRequest& request,
                              lathe::v1::SubmitResponse* response) {
  LATHE_ASSIGN_OR_RETURN(lathe::v1::SubmitRequest op, Admit(authorization, request));
  LATHE_ASSIGN_OR_RETURN(std::string op_id, ledger_->Submit(op));
  response->set_op_id(op_id);
  return absl::OkStatus();
}

absl::Status FrontEnd::SubmitSampling(absl::string_view authorization, const lathe::v1::SubmitRequest& request,
                                      const std::string& lane, lathe::v1::SubmitResponse* response) {
  LATHE_ASSIGN_OR_RETURN(lathe::v1::SubmitRequest op, Admit(authorization, request));
  // Outside the run's order only weights that cannot change may be read.
  if (!ReadsPinnedWeights(op)) {
    return absl::InvalidArgumentError("an unordered operation must be a sample or compute_logprobs of pinned weights");
  }
  LATHE_ASSIGN_OR_RETURN(std::string op_id, ledger_->SubmitUnordered(op, lane));
  response->set_op_id(op_id);
  return absl::OkStatus();
}

absl::Status FrontEnd::ResolveWeights(lathe::v1::SubmitRequest& op) const {
  std::string* path = nullptr;
  int64_t version = 0;
  if (op.has_sample()) path = op.mutable_sample()->mutable_model_path(), version = op.sample().policy_version();
  if (op.has_compute_logprobs()) {
    path = op.mutable_compute_logprobs()->mutable_model_path(), version = op.compute_logprobs().policy_version();
  }
  if (path == nullptr) return absl::OkStatus();
  if (version > 0) {
    // A pinned version becomes the path it was published under.
    std::optional<std::string> published = dispatcher_->PolicyPath(op.run_id(), version);
    if (!published.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("run ", op.run_id(), " has not published policy version ", version));
    }
    *path = *published;
  } else if (!path->empty() && !options_.checkpoint_root.empty()) {
    lathe::v1::GetCheckpointFilesRequest probe;
    probe.set_checkpoint_id(*path);
    probe.set_page_size(1);
    if (!store_.Files(probe).ok()) return absl::InvalidArgumentError("no sampler weights " + QuoteForMessage(*path));
  }
  return absl::OkStatus();
}

absl::Status FrontEnd::Retrieve(absl::string_view authorization, const lathe::v1::RetrieveRequest& request,
                                absl::Time deadline, lathe::v1::RetrieveResponse* response) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  LATHE_RETURN_IF_ERROR(ValidateOpId(request.op_id()));
  if (request.wait_ms() < 0) return absl::InvalidArgumentError("wait_ms must not be negative");
  absl::Duration wait = std::min(absl::Milliseconds(request.wait_ms()), options_.max_wait);
  // Never hold a poll past the caller's own deadline.
  if (deadline != absl::InfiniteFuture()) {
    wait = std::min(wait, std::max(absl::ZeroDuration(), deadline - absl::Now() - absl::Milliseconds(50)));
  }
  LATHE_ASSIGN_OR_RETURN(OpView view, ledger_->Wait(request.op_id(), wait));
  response->set_op_id(view.op_id);
  response->set_state(view.state);
  if (view.state == lathe::v1::RetrieveResponse::DONE) *response->mutable_result() = std::move(view.result);
  if (view.state == lathe::v1::RetrieveResponse::FAILED) *response->mutable_error() = std::move(view.error);
  return absl::OkStatus();
}

absl::Status FrontEnd::ListCheckpoints(absl::string_view authorization,
                                       const lathe::v1::ListCheckpointsRequest& request,
                                       lathe::v1::ListCheckpointsResponse* response) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  LATHE_ASSIGN_OR_RETURN(std::vector<lathe::v1::Checkpoint> list, store_.List(request.run_id()));
  for (auto& c : list) *response->add_checkpoints() = std::move(c);
  return absl::OkStatus();
}

absl::Status FrontEnd::GetCheckpointFiles(absl::string_view authorization,
                                          const lathe::v1::GetCheckpointFilesRequest& request,
                                          lathe::v1::GetCheckpointFilesResponse* response) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  LATHE_ASSIGN_OR_RETURN(*response, store_.Files(request));
  return absl::OkStatus();
}

absl::Status FrontEnd::DownloadCheckpointFile(absl::string_view authorization,
                                              const lathe::v1::DownloadCheckpointFileRequest& request,
                                              const std::function<bool(const lathe::v1::FileChunk&)>& write) const {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  return store_.Download(request.checkpoint_id(), request.relative_file_name(), write);
}

absl::Status FrontEnd::DeleteCheckpoint(absl::string_view authorization,
                                        const lathe::v1::DeleteCheckpointRequest& request) {
  LATHE_RETURN_IF_ERROR(Authorize(authorization));
  return store_.Delete(request.checkpoint_id());
}

}  // namespace lathe::coordinator
