// gRPC calls of the client, with per-call deadlines and submit retries.
#include "client/lathe_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "lathe/v1/service.grpc.pb.h"

namespace lathe::client {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// Transport failures after which the same submit may be sent again.
bool Retryable(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED;
}

}  // namespace

struct Client::Impl {
  ClientOptions options;
  std::unique_ptr<lathe::v1::Lathe::Stub> stub;

  void Prepare(grpc::ClientContext* context, absl::Duration timeout) const {
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    if (!options.api_key.empty()) context->AddMetadata("authorization", "Bearer " + options.api_key);
  }
};

std::unique_ptr<Client> Client::Connect(const ClientOptions& options) {
  std::unique_ptr<Client> client(new Client());
  client->impl_ = std::make_unique<Impl>();
  client->impl_->options = options;
  grpc::ChannelArguments args;
  const int limit = static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT32_MAX));
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  // Redial a restarted coordinator within a second or two, not after gRPC's
  // backoff grew towards its two minutes.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_root_certs.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs;
    credentials = grpc::SslCredentials(ssl);
  }
  client->impl_->stub = lathe::v1::Lathe::NewStub(grpc::CreateCustomChannel(options.address, credentials, args));
  return client;
}

Client::~Client() = default;

absl::StatusOr<lathe::v1::HealthResponse> Client::Health() {
  grpc::ClientContext context;
  impl_->Prepare(&context, impl_->options.rpc_timeout);
  lathe::v1::HealthResponse response;
  grpc::Status s = impl_->stub->Health(&context, lathe::v1::HealthRequest(), &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

bool Client::MayComeBack() {
  absl::StatusOr<lathe::v1::HealthResponse> h = Health();
  // Unreachable or starting: a restart. Lost or shutting down: it is over.
  return !h.ok() || h->state() == lathe::v1::HealthResponse::STARTING ||
         h->state() == lathe::v1::HealthResponse::SERVING;
}

absl::Status Client::WaitServing(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::string last = "no answer";
  while (absl::Now() < deadline) {
    absl::StatusOr<lathe::v1::HealthResponse> h = Health();
    if (h.ok() && h->state() == lathe::v1::HealthResponse::SERVING) return absl::OkStatus();
    if (h.ok() && h->state() == lathe::v1::HealthResponse::UNAVAILABLE) return absl::UnavailableError(h->detail());
    last = h.ok() ? h->detail() : h.status().ToString();
    absl::SleepFor(absl::Milliseconds(200));
  }
  return absl::DeadlineExceededError(absl::StrCat("deployment not serving after ", absl::FormatDuration(timeout),
                                                  ": ", last));
}

absl::StatusOr<lathe::v1::Capabilities> Client::GetCapabilities() {
  grpc::ClientContext context;
  impl_->Prepare(&context, impl_->options.rpc_timeout);
  lathe::v1::Capabilities response;
  grpc::Status s = impl_->stub->GetCapabilities(&context, lathe::v1::GetCapabilitiesRequest(), &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

absl::StatusOr<lathe::v1::RunInfo> Client::GetInfo(const std::string& run_id) {
  grpc::ClientContext context;
  impl_->Prepare(&context, impl_->options.rpc_timeout);
  lathe::v1::GetInfoRequest request;
  request.set_run_id(run_id);
  lathe::v1::RunInfo response;
  grpc::Status s = impl_->stub->GetInfo(&context, request, &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

absl::StatusOr<lathe::v1::ListCheckpointsResponse> Client::ListCheckpoints(const std::string& run_id) {
  grpc::ClientContext context;
  impl_->Prepare(&context, impl_->options.rpc_timeout);
  lathe::v1::ListCheckpointsRequest request;
  request.set_run_id(run_id);
  lathe::v1::ListCheckpointsResponse response;
  grpc::Status s = impl_->stub->ListCheckpoints(&context, request, &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

absl::StatusOr<std::pair<TrainingRun, lathe::v1::RunInfo>> Client::CreateRun(const lathe::v1::LoraConfig& lora,
                                                                             absl::Duration timeout) {
  grpc::ClientContext context;
  impl_->Prepare(&context, impl_->options.rpc_timeout);
  lathe::v1::CreateRunRequest request;
  *request.mutable_lora() = lora;
  lathe::v1::CreateRunResponse response;
  grpc::Status s = impl_->stub->CreateRun(&context, request, &response);
  if (!s.ok()) return FromGrpc(s);
  absl::StatusOr<lathe::v1::OpResult> init = OpFuture(this, response.init_op_id()).result(timeout);
  if (!init.ok()) return init.status();
  return std::make_pair(TrainingRun(this, response.run_id()), init->init());
}

absl::StatusOr<OpFuture> Client::Submit(const lathe::v1::SubmitRequest& op) {
  grpc::Status s;
  // The same seq_id is sent again, so the ledger answers a submit that was
  // accepted before the failure with its op id (also after a restart).
  const absl::Time reconnect_deadline = absl::Now() + impl_->options.reconnect_timeout;
  for (int attempt = 0; attempt < std::max(1, impl_->options.submit_attempts) ||
                        (s.error_code() == grpc::StatusCode::UNAVAILABLE && absl::Now() < reconnect_deadline &&
                         MayComeBack());
       ++attempt) {
    if (attempt > 0) absl::SleepFor(std::min(absl::Milliseconds(200) * attempt, absl::Seconds(1)));
    grpc::ClientContext context;
    impl_->Prepare(&context, impl_->options.rpc_timeout);
    lathe::v1::SubmitResponse response;
    s = impl_->stub->Submit(&context, op, &response);
    if (s.ok()) return OpFuture(this, response.op_id());
    if (!Retryable(s.error_code())) break;
  }
  return FromGrpc(s);
}

const ClientOptions& Client::options() const { return impl_->options; }

absl::StatusOr<lathe::v1::RetrieveResponse> Client::Retrieve(const std::string& op_id, absl::Duration wait) {
  grpc::ClientContext context;
  impl_->Prepare(&context, impl_->options.rpc_timeout + wait);
  lathe::v1::RetrieveRequest request;
  request.set_op_id(op_id);
  request.set_wait_ms(absl::ToInt64Milliseconds(wait));
  lathe::v1::RetrieveResponse response;
  grpc::Status s = impl_->stub->Retrieve(&context, request, &response);
  if (!s.ok()) return FromGrpc(s);
  return response;
}

absl::StatusOr<lathe::v1::OpResult> OpFuture::result(absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  const absl::Duration reconnect = client_->options().reconnect_timeout;
  absl::Time unavailable_since = absl::InfiniteFuture();
  for (;;) {
    const absl::Duration wait = std::max(absl::ZeroDuration(), std::min(deadline - absl::Now(), absl::Seconds(30)));
    absl::StatusOr<lathe::v1::RetrieveResponse> r = client_->Retrieve(op_id_, wait);
    if (!r.ok()) {
      // A coordinator restarting from its journal answers the op again.
      if (unavailable_since == absl::InfiniteFuture()) unavailable_since = absl::Now();
      if (!absl::IsUnavailable(r.status()) || absl::Now() >= std::min(deadline, unavailable_since + reconnect) ||
          !client_->MayComeBack()) {
        return r.status();
      }
      absl::SleepFor(absl::Milliseconds(200));
      continue;
    }
    unavailable_since = absl::InfiniteFuture();
    if (r->state() == lathe::v1::RetrieveResponse::DONE) return std::move(*r->mutable_result());
    if (r->state() == lathe::v1::RetrieveResponse::FAILED) {
      const bool user = r->error().category() == lathe::v1::OpError::USER;
      return absl::Status(static_cast<absl::StatusCode>(r->error().code()),
                          absl::StrCat(user ? "user error: " : "server error: ", r->error().message()));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("operation ", op_id_, " still pending after ",
                                                      absl::FormatDuration(timeout)));
    }
  }
}

absl::StatusOr<OpFuture> TrainingRun::Submit(lathe::v1::SubmitRequest op) {
  op.set_run_id(run_id_);
  op.set_seq_id(next_seq_);
  absl::StatusOr<OpFuture> future = client_->Submit(op);
  // A refused submit used no seq_id; the next operation takes it.
  if (future.ok()) ++next_seq_;
  return future;
}

absl::StatusOr<OpFuture> TrainingRun::ForwardBackward(const lathe::v1::ForwardBackwardInput& input) {
  lathe::v1::SubmitRequest op;
  *op.mutable_forward_backward() = input;
  return Submit(std::move(op));
}

absl::StatusOr<OpFuture> TrainingRun::Forward(const lathe::v1::ForwardBackwardInput& input) {
  lathe::v1::SubmitRequest op;
  *op.mutable_forward() = input;
  return Submit(std::move(op));
}

absl::StatusOr<OpFuture> TrainingRun::OptimStep(const lathe::v1::AdamParams& params) {
  lathe::v1::SubmitRequest op;
  *op.mutable_optim_step() = params;
  return Submit(std::move(op));
}

absl::StatusOr<OpFuture> TrainingRun::Init(const lathe::v1::LoraConfig& lora) {
  lathe::v1::SubmitRequest op;
  *op.mutable_init()->mutable_lora() = lora;
  return Submit(std::move(op));
}

absl::StatusOr<OpFuture> TrainingRun::Noop() {
  lathe::v1::SubmitRequest op;
  op.mutable_noop();
  return Submit(std::move(op));
}

}  // namespace lathe::client
