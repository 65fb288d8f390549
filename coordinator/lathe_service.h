// The client-facing lathe.v1.Lathe service on top of the ledger, the replica
// registry and the dispatcher.
#ifndef LATHE_COORDINATOR_LATHE_SERVICE_H_
#define LATHE_COORDINATOR_LATHE_SERVICE_H_

#include <vector>

#include "absl/synchronization/mutex.h"
#include "coordinator/auth.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/dispatcher.h"
#include "coordinator/op_ledger.h"
#include "coordinator/replica_registry.h"
#include "lathe/v1/service.grpc.pb.h"

namespace lathe::coordinator {

struct ServiceOptions {
  int max_runs = 1;
  absl::Duration max_wait = absl::Seconds(40);  // Retrieve's cap
  std::string checkpoint_root;                  // the workers' --checkpoint_root, for listing
  std::vector<lathe::v1::ModelPreset> presets;  // served by GetCapabilities
};

// Every method but Health needs an API key (when keys are on). The key is
// checked on the call's metadata before its request message is read: each
// such method is served as a stream (one message in, one or more out, the
// same bytes on the wire), because gRPC reads a unary request whole before
// any handler runs, so an unauthenticated caller could otherwise make the
// coordinator buffer up to the receive limit.
class LatheService final : public lathe::v1::Lathe::Service {
 public:
  // None owned; all outlive the service.
  LatheService(ServiceOptions options, const ApiKeys* keys, OpLedger* ledger, ReplicaRegistry* registry,
               Dispatcher* dispatcher);

  grpc::Status GetCapabilities(grpc::ServerContext* context, const lathe::v1::GetCapabilitiesRequest* request,
                               lathe::v1::Capabilities* response) override;
  grpc::Status Health(grpc::ServerContext* context, const lathe::v1::HealthRequest* request,
                      lathe::v1::HealthResponse* response) override;
  grpc::Status GetInfo(grpc::ServerContext* context, const lathe::v1::GetInfoRequest* request,
                       lathe::v1::RunInfo* response) override;
  grpc::Status CreateRun(grpc::ServerContext* context, const lathe::v1::CreateRunRequest* request,
                         lathe::v1::CreateRunResponse* response) override;
  grpc::Status Submit(grpc::ServerContext* context, const lathe::v1::SubmitRequest* request,
                      lathe::v1::SubmitResponse* response) override;
  grpc::Status Retrieve(grpc::ServerContext* context, const lathe::v1::RetrieveRequest* request,
                        lathe::v1::RetrieveResponse* response) override;
  grpc::Status ListCheckpoints(grpc::ServerContext* context, const lathe::v1::ListCheckpointsRequest* request,
                               lathe::v1::ListCheckpointsResponse* response) override;
  grpc::Status GetCheckpointFiles(grpc::ServerContext* context, const lathe::v1::GetCheckpointFilesRequest* request,
                                  lathe::v1::GetCheckpointFilesResponse* response) override;
  grpc::Status DeleteCheckpoint(grpc::ServerContext* context, const lathe::v1::DeleteCheckpointRequest* request,
                                lathe::v1::DeleteCheckpointResponse* response) override;
  const CheckpointStore& checkpoints() const { return store_; }

 private:
  // OK when the deployment serves; UNAVAILABLE saying why not.
  grpc::Status Serving() const;
  // Serves `method` as a stream whose request is read after the key check,
  // then handled by `handler`.
  template <class Request, class Response>
  void ReadAfterKeyCheck(const char* method,
                         grpc::Status (LatheService::*handler)(grpc::ServerContext*, const Request*, Response*));
  // Turns a sample's or compute_logprobs' policy_version into the path it was
  // published under; INVALID_ARGUMENT for an unknown version or checkpoint.
  grpc::Status ResolveWeights(lathe::v1::SubmitRequest& op) const;

  const ServiceOptions options_;
  const ApiKeys* keys_;
  OpLedger* ledger_;
  ReplicaRegistry* registry_;
  Dispatcher* dispatcher_;
  absl::Mutex create_mu_;  // one CreateRun at a time, so max_runs holds
  CheckpointStore store_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_LATHE_SERVICE_H_
