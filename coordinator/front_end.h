// The transport-free front end of the coordinator: every client request
// (runs, operations, results, checkpoints, health) is checked and handled
// here, whichever door it came through. The gRPC Lathe service and the HTTP
// door only translate their wire formats to these calls and back.
#ifndef LATHE_COORDINATOR_FRONT_END_H_
#define LATHE_COORDINATOR_FRONT_END_H_

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/auth.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/dispatcher.h"
#include "coordinator/op_ledger.h"
#include "coordinator/replica_registry.h"
#include "lathe/v1/service.pb.h"

namespace lathe::coordinator {

struct ServiceOptions {
  int max_runs = 1;
  absl::Duration max_wait = absl::Seconds(40);  // Retrieve's cap
  std::string checkpoint_root;                  // the workers' --checkpoint_root, for listing
  std::vector<lathe::v1::ModelPreset> presets;  // served by GetCapabilities
};

// Every method but Health takes the caller's credential as the value of an
// authorization header ("Bearer <key>" or "Api-Key <key>"; empty: none) and
// answers UNAUTHENTICATED before looking at the request when keys are on and
// it is not one of them. Errors follow docs/service.md ("Errors at submit");
// messages may quote client input (cut to 128 bytes) and are not yet cut to
// a transport's limit. Thread-safe.
class FrontEnd {
 public:
  // None owned; all outlive the front end.
  FrontEnd(ServiceOptions options, const ApiKeys* keys, OpLedger* ledger, ReplicaRegistry* registry,
           Dispatcher* dispatcher);

  // OK, or UNAUTHENTICATED saying what is wrong (never the expected key).
  absl::Status Authorize(absl::string_view authorization) const;
  // The deployment's model, layout, vocabulary and presets.
  absl::Status GetCapabilities(absl::string_view authorization, lathe::v1::Capabilities* response) const;
  // Open to every caller (probes).
  void Health(lathe::v1::HealthResponse* response) const;
  absl::Status GetInfo(absl::string_view authorization, const lathe::v1::GetInfoRequest& request,
                       lathe::v1::RunInfo* response) const;
  // Every run not deleted, by run id.
  absl::Status ListRuns(absl::string_view authorization, std::vector<lathe::v1::RunInfo>* runs) const;
  absl::Status CreateRun(absl::string_view authorization, const lathe::v1::CreateRunRequest& request,
                         lathe::v1::CreateRunResponse* response);
  absl::Status Submit(absl::string_view authorization, const lathe::v1::SubmitRequest& request,
                      lathe::v1::SubmitResponse* response);
  // A sample / compute_logprobs pinned to published weights (model_path,
  // policy_version or base), outside the run's seq_id order: the ledger's
  // SubmitUnordered under `lane` (a sampling session). InvalidArgument for
  // another operation or unpinned weights; otherwise as Submit.
  absl::Status SubmitSampling(absl::string_view authorization, const lathe::v1::SubmitRequest& request,
                              const std::string& lane, lathe::v1::SubmitResponse* response);
  // Waits up to the request's wait_ms, capped at ServiceOptions::max_wait and
  // at `deadline` (the caller's own; InfiniteFuture: none).
  absl::Status Retrieve(absl::string_view authorization, const lathe::v1::RetrieveRequest& request,
                        absl::Time deadline, lathe::v1::RetrieveResponse* response) const;
  absl::Status ListCheckpoints(absl::string_view authorization, const lathe::v1::ListCheckpointsRequest& request,
                               lathe::v1::ListCheckpointsResponse* response) const;
  absl::Status GetCheckpointFiles(absl::string_view authorization,
                                  const lathe::v1::GetCheckpointFilesRequest& request,
                                  lathe::v1::GetCheckpointFilesResponse* response) const;
  // Streams the file to `write` chunk by chunk (false from `write`: stop).
  absl::Status DownloadCheckpointFile(absl::string_view authorization,
                                      const lathe::v1::DownloadCheckpointFileRequest& request,
                                      const std::function<bool(const lathe::v1::FileChunk&)>& write) const;
  absl::Status DeleteCheckpoint(absl::string_view authorization, const lathe::v1::DeleteCheckpointRequest& request);

  // Puts back a run restored from the journal: a retry of the CreateRun
  // that chose its id answers it again.
  void RestoreRun(const lathe::v1::JournalRun& run);

  const CheckpointStore& checkpoints() const { return store_; }

 private:
  // OK when the deployment serves; UNAVAILABLE saying why not.
  absl::Status Serving() const;
  // What both submits check first: the key, that the deployment serves, the
  // run id and the operation; the operation with its weights resolved.
  absl::StatusOr<lathe::v1::SubmitRequest> Admit(absl::string_view authorization,
                                                 const lathe::v1::SubmitRequest& request) const;
  // Turns a sample's or compute_logprobs' policy_version into the path it was
  // published under; INVALID_ARGUMENT for an unknown version or checkpoint.
  absl::Status ResolveWeights(lathe::v1::SubmitRequest& op) const;

  const ServiceOptions options_;
  const ApiKeys* keys_;
  OpLedger* ledger_;
  ReplicaRegistry* registry_;
  Dispatcher* dispatcher_;
  absl::Mutex create_mu_;  // one CreateRun at a time, so max_runs holds
  // Runs created with a client-chosen run_id: the request that made each
  // and its init op id, so a retry of it answers the same run. One small
  // entry per such run for the coordinator's lifetime (a run id is never
  // reused, deleted or not).
  struct Chosen {
    lathe::v1::CreateRunRequest request;
    std::string init_op_id;
  };
  std::map<std::string, Chosen> chosen_ ABSL_GUARDED_BY(create_mu_);
  CheckpointStore store_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_FRONT_END_H_
