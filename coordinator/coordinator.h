// A running coordinator: the gRPC server (Lathe, ReplicaLink, the standard
// grpc.health.v1 service and server reflection) with its ledger, replica
// registry, dispatcher and a housekeeping thread (heartbeats, gap timeouts,
// result expiry).
#ifndef LATHE_COORDINATOR_COORDINATOR_H_
#define LATHE_COORDINATOR_COORDINATOR_H_

#include <grpcpp/server.h>

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "coordinator/auth.h"
#include "coordinator/dispatcher.h"
#include "coordinator/front_end.h"
#include "coordinator/lathe_service.h"
#include "coordinator/link_service.h"
#include "coordinator/ops_metrics.h"
#include "coordinator/ops_view.h"
#include "coordinator/run_history.h"

namespace lathe::coordinator {

// 64 MiB: the largest preset max_seq_len (16384 tokens) x 128 datums x 32
// bytes per token (int32 token, int64 target, up to five float32 inputs).
inline constexpr int64_t kDefaultMaxRequestBytes = int64_t{64} << 20;

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:7777";  // port 0 picks a free one
  int replicas = 1;
  absl::Duration heartbeat_interval = absl::Seconds(1);
  absl::Duration heartbeat_timeout = absl::Seconds(10);
  absl::Duration op_timeout = absl::Hours(2);
  // Sampling requests on the replicas at once (Dispatcher's sampling_depth).
  int max_inflight_samples = 64;
  LedgerOptions ledger;
  ServiceOptions service;
  AuthMode auth = AuthMode::kAuto;
  std::string api_keys_file;
  // The replica leaders' credential (WorkerToken::Load: this file, else
  // $LATHE_WORKER_TOKEN); required.
  std::string worker_token_file;
  // PEM files of the server certificate (chain) and its key: serve TLS.
  std::string tls_cert_file;
  std::string tls_key_file;
  // Serve plaintext on an address other than loopback (else refused).
  bool insecure_listen = false;
  // Largest message accepted from a client or a replica
  // (kDefaultMaxRequestBytes: docs/service.md derives it).
  int64_t max_request_bytes = kDefaultMaxRequestBytes;
  // Where the journal lives (coordinator/journal.h); empty: none, and a
  // restart forgets every run and result.
  std::string journal_dir;
  // The MFU denominator per device (docs/operations.md); 0: no MFU.
  double peak_flops_per_device = 0;
};

class Coordinator {
 public:
  // Binds and starts serving; with a journal_dir, first restores the runs,
  // results and unfinished ops it holds (those wait for the replicas to
  // register again, see Dispatcher's "Recovery"). InvalidArgument for bad options (half a TLS
  // pair, a worker token that is also an API key); FailedPrecondition for a
  // plaintext listen off loopback without insecure_listen, or no worker
  // token; NotFound for an unreadable TLS, token or key file; Unavailable
  // when the address cannot be bound; the key loader's errors.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Start(const CoordinatorOptions& options);
  ~Coordinator();

  int port() const { return port_; }
  ReplicaRegistry& registry() { return *registry_; }
  // The request handling every door shares (the gRPC service, the HTTP door).
  FrontEnd& front_end() { return *front_end_; }
  // The operator's metrics and page data (docs/operations.md).
  const OpsView& ops() const { return *ops_view_; }
  // Refuses new operations, fails the unfinished ones, tells the replicas to
  // stop and stops the server (waiting up to `grace` for calls in flight).
  void Shutdown(const std::string& reason, absl::Duration grace);

 private:
  Coordinator() = default;
  void Housekeeping();
  // Opens the journal and restores the ledger, runs and chosen run ids.
  absl::Status Restore();
  // Once every replica registered: settles recovered ops, starts dispatching.
  void StartDispatching();

  CoordinatorOptions options_;
  std::unique_ptr<ApiKeys> keys_;
  std::unique_ptr<WorkerToken> worker_token_;
  std::unique_ptr<Journal> journal_;  // before the ledger, which writes to it
  std::unique_ptr<OpLedger> ledger_;
  std::unique_ptr<ReplicaRegistry> registry_;
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<FrontEnd> front_end_;
  std::unique_ptr<RunHistory> history_;
  std::unique_ptr<OpsMetrics> metrics_;  // the dispatcher's observer
  std::unique_ptr<OpsView> ops_view_;
  std::unique_ptr<LatheService> lathe_service_;
  std::unique_ptr<LinkService> link_service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;  // Start got to the end
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // The journal held unfinished ops: dispatching waits for the replicas.
  bool dispatching_ = false;  // housekeeping thread only (and Start)
  std::vector<lathe::v1::JournalRecord> restored_;
  std::thread housekeeping_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_COORDINATOR_H_
