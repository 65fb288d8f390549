// Request handling of lathe.v1.Lathe: checks, then the ledger.
#include "coordinator/lathe_service.h"

#include <google/protobuf/descriptor.h>

#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/op_validation.h"
#include "coordinator/request_limits.h"
#include "runtime/quote.h"
#include "runtime/status.h"

namespace lathe::coordinator {
namespace {

using runtime::QuoteForMessage;

// Every status message that is not a constant goes through one of these two,
// so none, whatever it quotes, exceeds kMaxStatusMessageBytes.
grpc::Status Answer(grpc::StatusCode code, absl::string_view message) {
  return grpc::Status(code, runtime::TruncateMessage(message, kMaxStatusMessageBytes));
}

grpc::Status ToGrpc(const absl::Status& s) {
  return Answer(static_cast<grpc::StatusCode>(s.code()), s.message());
}

std::string NewRunId() {
  static std::mt19937_64 rng(std::random_device{}());
  static absl::Mutex mu;
  absl::MutexLock lock(&mu);
  return absl::StrFormat("run-%016x", rng());
}

// The index gRPC gives a method: its position in the service's descriptor.
int MethodIndex(const char* method) {
  const google::protobuf::ServiceDescriptor* service =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(lathe::v1::Lathe::service_full_name());
  LATHE_CHECK(service != nullptr && service->FindMethodByName(method) != nullptr);
  return service->FindMethodByName(method)->index();
}

// A stream whose one request could not be read: the transport already ended
// the call (e.g. RESOURCE_EXHAUSTED for a message over the receive limit),
// or the client sent none.
// The one request of a call could not be read: the client sent none, or its
// bytes do not parse as the method's message. (When the transport itself
// ended the call, e.g. past the receive limit, its status stands.)
grpc::Status NoRequest(const char* method) {
  return {grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("the request of /lathe.v1.Lathe/", method, " is missing or does not parse as its message")};
}

}  // namespace

LatheService::LatheService(ServiceOptions options, const ApiKeys* keys, OpLedger* ledger,
                           ReplicaRegistry* registry, Dispatcher* dispatcher)
    : options_(options), keys_(keys), ledger_(ledger), registry_(registry), dispatcher_(dispatcher),
      store_(options.checkpoint_root) {
  ReadAfterKeyCheck("GetCapabilities", &LatheService::GetCapabilities);
  ReadAfterKeyCheck("GetInfo", &LatheService::GetInfo);
  ReadAfterKeyCheck("CreateRun", &LatheService::CreateRun);
  ReadAfterKeyCheck("Submit", &LatheService::Submit);
  ReadAfterKeyCheck("Retrieve", &LatheService::Retrieve);
  ReadAfterKeyCheck("ListCheckpoints", &LatheService::ListCheckpoints);
  ReadAfterKeyCheck("GetCheckpointFiles", &LatheService::GetCheckpointFiles);
  ReadAfterKeyCheck("DeleteCheckpoint", &LatheService::DeleteCheckpoint);
  using Request = lathe::v1::DownloadCheckpointFileRequest;
  using Chunk = lathe::v1::FileChunk;
  auto download = [this](grpc::ServerContext* context, grpc::ServerSplitStreamer<Request, Chunk>* stream) {
    // Before Read: nothing of the request is read for a caller without a key.
    if (grpc::Status s = keys_->Check(*context); !s.ok()) return s;
    Request request;
    if (!stream->Read(&request)) return NoRequest("DownloadCheckpointFile");
    return ToGrpc(store_.Download(request.checkpoint_id(), request.relative_file_name(),
                                  [stream](const Chunk& chunk) { return stream->Write(chunk); }));
  };
  MarkMethodStreamed(MethodIndex("DownloadCheckpointFile"),
                     new grpc::internal::SplitServerStreamingHandler<Request, Chunk>(download));
}

template <class Request, class Response>
void LatheService::ReadAfterKeyCheck(
    const char* method, grpc::Status (LatheService::*handler)(grpc::ServerContext*, const Request*, Response*)) {
  auto unary = [this, handler, method](grpc::ServerContext* context,
                                       grpc::ServerUnaryStreamer<Request, Response>* stream) {
    // Before Read: nothing of the request is read for a caller without a key.
    if (grpc::Status s = keys_->Check(*context); !s.ok()) return s;
    Request request;
    if (!stream->Read(&request)) return NoRequest(method);
    Response response;
    grpc::Status s = (this->*handler)(context, &request, &response);
    if (s.ok()) stream->Write(response);
    return s;
  };
  MarkMethodStreamed(MethodIndex(method), new grpc::internal::StreamedUnaryHandler<Request, Response>(unary));
}

grpc::Status LatheService::Serving() const {
  switch (registry_->state()) {
    case DeploymentState::kServing:
      return grpc::Status::OK;
    case DeploymentState::kStarting:
      return Answer(grpc::StatusCode::UNAVAILABLE, "the deployment is starting: " + registry_->detail());
    case DeploymentState::kLost:
      return Answer(grpc::StatusCode::UNAVAILABLE, "the deployment lost a replica: " + registry_->detail());
    case DeploymentState::kShuttingDown:
      return {grpc::StatusCode::UNAVAILABLE, "the deployment is shutting down"};
  }
  return {grpc::StatusCode::UNAVAILABLE, "unknown state"};
}

grpc::Status LatheService::GetCapabilities(grpc::ServerContext*, const lathe::v1::GetCapabilitiesRequest*,
                                           lathe::v1::Capabilities* response) {
  const lathe::v1::ModelSummary model = registry_->model();
  if (!model.base_model().empty()) response->add_base_models(model.base_model());
  response->set_max_seq_len(model.max_seq_len());
  *response->mutable_layout() = registry_->layout();
  response->mutable_layout()->set_replicas(registry_->expected());
  response->set_architecture(model.architecture());
  response->set_vocab_size(model.vocab_size());
  for (const lathe::v1::ModelPreset& p : options_.presets) *response->add_presets() = p;
  return grpc::Status::OK;
}

grpc::Status LatheService::Health(grpc::ServerContext*, const lathe::v1::HealthRequest*,
                                  lathe::v1::HealthResponse* response) {
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
  return grpc::Status::OK;
}

grpc::Status LatheService::GetInfo(grpc::ServerContext*, const lathe::v1::GetInfoRequest* request,
                                   lathe::v1::RunInfo* response) {
  if (absl::Status s = ValidateRunId(request->run_id()); !s.ok()) return ToGrpc(s);
  std::optional<lathe::v1::RunInfo> info = dispatcher_->Run(request->run_id());
  if (!info.has_value()) return Answer(grpc::StatusCode::NOT_FOUND, "no run " + QuoteForMessage(request->run_id()));
  *response = *info;
  return grpc::Status::OK;
}

grpc::Status LatheService::CreateRun(grpc::ServerContext*, const lathe::v1::CreateRunRequest* request,
                                     lathe::v1::CreateRunResponse* response) {
  if (grpc::Status s = Serving(); !s.ok()) return s;
  if (absl::Status s = ValidateBaseModel(request->base_model()); !s.ok()) return ToGrpc(s);
  const lathe::v1::ModelSummary model = registry_->model();
  if (!request->base_model().empty() && request->base_model() != model.base_model()) {
    return Answer(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("this deployment serves ", model.base_model(),
                                                                   ", not ", QuoteForMessage(request->base_model())));
  }
  if (absl::Status s = ValidateLora(request->lora(), model); !s.ok()) return ToGrpc(s);
  absl::MutexLock lock(&create_mu_);
  if (dispatcher_->runs() >= options_.max_runs) {
    return Answer(grpc::StatusCode::RESOURCE_EXHAUSTED,
                  absl::StrCat("this deployment holds at most ", options_.max_runs,
                               " run(s) (--max_runs); re-initialise an existing run with an init operation"));
  }
  const std::string run_id = NewRunId();
  lathe::v1::RunInfo info;
  info.set_run_id(run_id);
  info.set_base_model(model.base_model());
  *info.mutable_lora() = request->lora();
  dispatcher_->AddRun(info);
  if (absl::Status s = ledger_->OpenRun(run_id, 0); !s.ok()) return ToGrpc(s);
  lathe::v1::SubmitRequest init;
  init.set_run_id(run_id);
  *init.mutable_init()->mutable_lora() = request->lora();
  absl::StatusOr<std::string> op_id = ledger_->SubmitInternal(init);
  if (!op_id.ok()) return ToGrpc(op_id.status());
  response->set_run_id(run_id);
  response->set_init_op_id(*op_id);
  return grpc::Status::OK;
}

grpc::Status LatheService::Submit(grpc::ServerContext*, const lathe::v1::SubmitRequest* request,
                                  lathe::v1::SubmitResponse* response) {
  if (grpc::Status s = Serving(); !s.ok()) return s;
  if (absl::Status s = ValidateRunId(request->run_id()); !s.ok()) return ToGrpc(s);
  if (absl::Status s = ValidateOp(*request, registry_->model()); !s.ok()) return ToGrpc(s);
  lathe::v1::SubmitRequest op = *request;
  if (grpc::Status s = ResolveWeights(op); !s.ok()) return s;
  absl::StatusOr<std::string> op_id = ledger_->Submit(op);
  if (!op_id.ok()) return ToGrpc(op_id.status());
  if (op.has_delete_run()) ledger_->CloseRun(op.run_id(), op.seq_id());
  response->set_op_id(*op_id);
  return grpc::Status::OK;
}

grpc::Status LatheService::ResolveWeights(lathe::v1::SubmitRequest& op) const {
  std::string* path = nullptr;
  int64_t version = 0;
  if (op.has_sample()) path = op.mutable_sample()->mutable_model_path(), version = op.sample().policy_version();
  if (op.has_compute_logprobs()) {
    path = op.mutable_compute_logprobs()->mutable_model_path(), version = op.compute_logprobs().policy_version();
  }
  if (path == nullptr) return grpc::Status::OK;
  if (version > 0) {
    // A pinned version becomes the path it was published under.
    std::optional<std::string> published = dispatcher_->PolicyPath(op.run_id(), version);
    if (!published.has_value()) {
      return Answer(grpc::StatusCode::INVALID_ARGUMENT,
                    absl::StrCat("run ", op.run_id(), " has not published policy version ", version));
    }
    *path = *published;
  } else if (!path->empty() && !options_.checkpoint_root.empty()) {
    lathe::v1::GetCheckpointFilesRequest probe;
    probe.set_checkpoint_id(*path);
    probe.set_page_size(1);
    if (!store_.Files(probe).ok()) {
      return Answer(grpc::StatusCode::INVALID_ARGUMENT, "no sampler weights " + QuoteForMessage(*path));
    }
  }
  return grpc::Status::OK;
}

grpc::Status LatheService::Retrieve(grpc::ServerContext* context, const lathe::v1::RetrieveRequest* request,
                                    lathe::v1::RetrieveResponse* response) {
  if (absl::Status s = ValidateOpId(request->op_id()); !s.ok()) return ToGrpc(s);
  if (request->wait_ms() < 0) return {grpc::StatusCode::INVALID_ARGUMENT, "wait_ms must not be negative"};
  absl::Duration wait = std::min(absl::Milliseconds(request->wait_ms()), options_.max_wait);
  // Never hold a poll past the caller's own deadline (none: time_point::max).
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    const absl::Duration left = absl::FromChrono(context->deadline()) - absl::Now() - absl::Milliseconds(50);
    wait = std::min(wait, std::max(absl::ZeroDuration(), left));
  }
  absl::StatusOr<OpView> view = ledger_->Wait(request->op_id(), wait);
  if (!view.ok()) return ToGrpc(view.status());
  response->set_op_id(view->op_id);
  response->set_state(view->state);
  if (view->state == lathe::v1::RetrieveResponse::DONE) *response->mutable_result() = std::move(view->result);
  if (view->state == lathe::v1::RetrieveResponse::FAILED) *response->mutable_error() = std::move(view->error);
  return grpc::Status::OK;
}

grpc::Status LatheService::ListCheckpoints(grpc::ServerContext*,
                                           const lathe::v1::ListCheckpointsRequest* request,
                                           lathe::v1::ListCheckpointsResponse* response) {
  absl::StatusOr<std::vector<lathe::v1::Checkpoint>> list = store_.List(request->run_id());
  if (!list.ok()) return ToGrpc(list.status());
  for (auto& c : *list) *response->add_checkpoints() = std::move(c);
  return grpc::Status::OK;
}

grpc::Status LatheService::GetCheckpointFiles(grpc::ServerContext*,
                                              const lathe::v1::GetCheckpointFilesRequest* request,
                                              lathe::v1::GetCheckpointFilesResponse* response) {
  absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> page = store_.Files(*request);
  if (!page.ok()) return ToGrpc(page.status());
  *response = *std::move(page);
  return grpc::Status::OK;
}

grpc::Status LatheService::DeleteCheckpoint(grpc::ServerContext*,
                                            const lathe::v1::DeleteCheckpointRequest* request,
                                            lathe::v1::DeleteCheckpointResponse*) {
  return ToGrpc(store_.Delete(request->checkpoint_id()));
}

}  // namespace lathe::coordinator
