// The client-facing lathe.v1.Lathe gRPC service: a thin shell over the
// coordinator's FrontEnd (coordinator/front_end.h).
#ifndef LATHE_COORDINATOR_LATHE_SERVICE_H_
#define LATHE_COORDINATOR_LATHE_SERVICE_H_

#include "coordinator/front_end.h"
#include "lathe/v1/service.grpc.pb.h"

namespace lathe::coordinator {

// Every method but Health needs an API key (when keys are on). The key is
// checked on the call's metadata before its request message is read: each
// such method is served as a stream (one message in, one or more out, the
// same bytes on the wire), because gRPC reads a unary request whole before
// any handler runs, so an unauthenticated caller could otherwise make the
// coordinator buffer up to the receive limit.
class LatheService final : public lathe::v1::Lathe::Service {
 public:
  // Not owned; outlives the service.
  explicit LatheService(FrontEnd* front_end);

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

 private:
  // Serves `method` as a stream whose request is read after the key check,
  // then handled by `handler`.
  template <class Request, class Response>
  void ReadAfterKeyCheck(const char* method,
                         grpc::Status (LatheService::*handler)(grpc::ServerContext*, const Request*, Response*));

  FrontEnd* front_end_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_LATHE_SERVICE_H_
