// Wiring of the coordinator's parts and its lifecycle.
#include "coordinator/coordinator.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "coordinator/parse_error_interceptor.h"
#include "core/log.h"
#include "core/op_error.h"
#include "core/status.h"

namespace lathe::coordinator {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// TLS from the certificate and key files; plaintext only on loopback or
// when asked for.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ListenCredentials(const CoordinatorOptions& o) {
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  }
  if (o.tls_cert_file.empty()) {
    if (IsLoopback(o.listen) || o.insecure_listen) return grpc::InsecureServerCredentials();
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to serve plaintext on ", o.listen, ": API keys and training data would cross the network "
        "unencrypted; give --tls_cert and --tls_key, or --insecure_listen on a network you trust"));
  }
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  LATHE_ASSIGN_OR_RETURN(pair.cert_chain, ReadFile(o.tls_cert_file, "TLS certificate"));
  LATHE_ASSIGN_OR_RETURN(pair.private_key, ReadFile(o.tls_key_file, "TLS key"));
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Start(const CoordinatorOptions& options) {
  if (options.replicas < 1) return absl::InvalidArgumentError("--replicas must be >= 1");
  if (options.heartbeat_interval <= absl::ZeroDuration() || options.heartbeat_timeout <= options.heartbeat_interval) {
    return absl::InvalidArgumentError("the heartbeat interval must be positive and the timeout must exceed it");
  }
  // A duration that is not positive would fail or forget everything at once;
  // a huge one saturates (absl::Duration) and means never.
  for (const auto& [name, d] : {std::pair<const char*, absl::Duration>{"--gap_timeout_s", options.ledger.gap_timeout},
                                {"--result_ttl_s", options.ledger.result_ttl},
                                {"--op_timeout_s", options.op_timeout}}) {
    if (d <= absl::ZeroDuration()) return absl::InvalidArgumentError(absl::StrCat(name, " must be positive"));
  }
  if (options.ledger.max_unfinished < 1) return absl::InvalidArgumentError("--max_queued must be >= 1");
  if (options.max_request_bytes < 1024 || options.max_request_bytes > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError("--max_request_bytes must be between 1 KiB and 2 GiB");
  }
  LATHE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, ListenCredentials(options));
  LATHE_ASSIGN_OR_RETURN(ApiKeys keys, ApiKeys::Load(options.auth, options.listen, options.api_keys_file));
  LATHE_ASSIGN_OR_RETURN(WorkerToken token, WorkerToken::Load(options.worker_token_file));
  if (keys.Contains(token.value())) {
    return absl::InvalidArgumentError("the worker token is also an API key: give the workers their own");
  }
  std::unique_ptr<Coordinator> c(new Coordinator());
  c->options_ = options;
  c->keys_ = std::make_unique<ApiKeys>(std::move(keys));
  c->worker_token_ = std::make_unique<WorkerToken>(std::move(token));
  if (!options.journal_dir.empty()) {
    LATHE_ASSIGN_OR_RETURN(c->journal_, Journal::Open(options.journal_dir, &c->restored_));
  }
  c->ledger_ = std::make_unique<OpLedger>(options.ledger, &RealClock(), c->journal_.get());
  c->registry_ = std::make_unique<ReplicaRegistry>(options.replicas, options.heartbeat_timeout);
  c->dispatcher_ = std::make_unique<Dispatcher>(c->ledger_.get(), c->registry_.get(), options.op_timeout,
                                                  /*depth=*/4, options.max_inflight_samples);
  OpLedger* ledger = c->ledger_.get();
  c->registry_->OnLost([ledger](const std::string& reason) {
    LATHE_LOG(Error, "deployment lost: %s", reason);
    ledger->FailAll(runtime::MakeOpError(lathe::v1::OpError::SERVER, absl::StatusCode::kUnavailable,
                                         absl::StrCat("the deployment lost a replica: ", reason)));
  });
  c->front_end_ = std::make_unique<FrontEnd>(options.service, c->keys_.get(), c->ledger_.get(),
                                             c->registry_.get(), c->dispatcher_.get());
  if (options.peak_flops_per_device < 0 || !std::isfinite(options.peak_flops_per_device)) {
    return absl::InvalidArgumentError("--peak_flops_per_device must be a finite number >= 0");
  }
  const CheckpointStore* store = options.service.checkpoint_root.empty() ? nullptr : &c->front_end_->checkpoints();
  c->history_ = std::make_unique<RunHistory>(options.service.checkpoint_root);
  c->metrics_ = std::make_unique<OpsMetrics>(c->registry_.get(), store, c->history_.get(),
                                             options.peak_flops_per_device);
  c->dispatcher_->SetObserver(c->metrics_.get());
  c->ops_view_ = std::make_unique<OpsView>(OpsViewParts{c->ledger_.get(), c->registry_.get(), c->dispatcher_.get(),
                                                        c->metrics_.get(), c->history_.get(), store,
                                                        options.peak_flops_per_device});
  LATHE_RETURN_IF_ERROR(c->Restore());
  c->lathe_service_ = std::make_unique<LatheService>(c->front_end_.get());
  c->link_service_ =
      std::make_unique<LinkService>(c->worker_token_.get(), c->registry_.get(), options.heartbeat_interval);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &c->port_);
  builder.RegisterService(c->lathe_service_.get());
  builder.RegisterService(c->link_service_.get());
  // Larger messages fail with RESOURCE_EXHAUSTED. What is sent is bounded by
  // what was received (results, tasks), so sending stays unlimited.
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_request_bytes));
  builder.SetMaxSendMessageSize(-1);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MakeParseErrorInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  c->server_ = builder.BuildAndStart();
  if (c->server_ == nullptr || c->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  c->server_->GetHealthCheckService()->SetServingStatus(false);
  {
    absl::MutexLock lock(&c->mu_);
    c->started_ = true;
  }
  if (c->ledger_->Recovered().empty()) {
    c->dispatcher_->Start();
    c->dispatching_ = true;
  }
  c->housekeeping_ = std::thread([p = c.get()] { p->Housekeeping(); });
  LATHE_LOG(Info, "coordinator listening on port %d (%s) for %d replica(s), API keys %s", c->port_,
            options.tls_cert_file.empty() ? "plaintext" : "TLS", options.replicas,
            c->keys_->enabled() ? "required" : "off");
  return c;
}

absl::Status Coordinator::Restore() {
  if (journal_ == nullptr) return absl::OkStatus();
  std::vector<lathe::v1::JournalRun> runs;
  LATHE_RETURN_IF_ERROR(ledger_->Restore(restored_, &runs));
  const size_t records = restored_.size();
  restored_.clear();
  int live = 0;
  for (const lathe::v1::JournalRun& run : runs) {
    dispatcher_->RestoreRun(run);
    front_end_->RestoreRun(run);
    live += !run.deleted();
    if (run.deleted()) continue;
    // The operator's gauges pick up where the history ends.
    if (auto lines = history_->Read(run.run_id(), 1000); lines.ok()) metrics_->Resume(run.run_id(), *lines);
  }
  const size_t unfinished = ledger_->Recovered().size();
  LATHE_LOG(Info, "journal %s: %d record(s), %d run(s) restored, %d unfinished op(s) to recover once the replicas "
            "register", journal_->path(), records, live, unfinished);
  return absl::OkStatus();
}

void Coordinator::StartDispatching() {
  const int settled = dispatcher_->Recover();
  LATHE_LOG(Info, "recovered %d op(s) from the replicas' answers; dispatching", settled);
  dispatcher_->Start();
  dispatching_ = true;
}

Coordinator::~Coordinator() { Shutdown("coordinator destroyed", absl::Seconds(5)); }

void Coordinator::Housekeeping() {
  const absl::Duration tick = std::min(absl::Milliseconds(200), options_.heartbeat_interval);
  absl::MutexLock lock(&mu_);
  auto stopping = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_; };
  bool serving = false;
  absl::Time next_expiry = absl::Now(), next_heartbeat = absl::Now();
  while (!mu_.AwaitWithTimeout(absl::Condition(&stopping), tick)) {
    registry_->CheckHeartbeats();
    if (!dispatching_ && registry_->state() == DeploymentState::kServing) {
      mu_.Unlock();
      StartDispatching();
      mu_.Lock();
    }
    if (absl::Now() >= next_heartbeat) {
      registry_->SendHeartbeats();
      next_heartbeat = absl::Now() + options_.heartbeat_interval;
    }
    ledger_->Sweep();
    if (!options_.service.checkpoint_root.empty() && absl::Now() >= next_expiry) {
      if (int n = front_end_->checkpoints().Expire(absl::Now()); n > 0) {
        LATHE_LOG(Info, "deleted %d expired checkpoint(s)", n);
      }
      next_expiry = absl::Now() + absl::Seconds(5);
    }
    // grpc.health.v1 says SERVING exactly while the deployment serves, so
    // readiness probes see what Health says.
    const bool now = registry_->state() == DeploymentState::kServing;
    if (now != serving) server_->GetHealthCheckService()->SetServingStatus(now);
    serving = now;
  }
}

void Coordinator::Shutdown(const std::string& reason, absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    // A Start that failed half way leaves nothing running: its parts only
    // need their destructors, and some of them were never built.
    if (stopping_ || !started_) return;
    stopping_ = true;
  }
  if (housekeeping_.joinable()) housekeeping_.join();
  ledger_->Close();
  server_->GetHealthCheckService()->SetServingStatus(false);
  registry_->Shutdown(reason);
  ledger_->FailAll(runtime::MakeOpError(lathe::v1::OpError::SERVER, absl::StatusCode::kUnavailable,
                                        absl::StrCat("the coordinator is shutting down: ", reason)));
  dispatcher_->Stop();
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  server_->Wait();
  // A clean stop ends the deployment: the replicas drop their runs, so
  // nothing is left to resume (only a crash leaves the journal to restore).
  if (journal_ != nullptr) {
    if (absl::Status s = journal_->Rewrite({}); !s.ok()) LATHE_LOG(Error, "cannot clear the journal: %s", s.message());
  }
}

}  // namespace lathe::coordinator
