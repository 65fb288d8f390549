// lathe.v1.ReplicaLink: one Connect stream per replica leader, feeding the
// registry (registration, heartbeats, answers, departure), and the
// deployment's rendezvous store (StoreSet / StoreGet).
#ifndef LATHE_COORDINATOR_LINK_SERVICE_H_
#define LATHE_COORDINATOR_LINK_SERVICE_H_

#include "coordinator/auth.h"
#include "coordinator/rendezvous_store.h"
#include "coordinator/replica_registry.h"
#include "lathe/v1/replica.grpc.pb.h"

namespace lathe::coordinator {

class LinkService final : public lathe::v1::ReplicaLink::Service {
 public:
  // Neither owned; both outlive the service. A stream without `token` is
  // refused (UNAUTHENTICATED) before its first message is read; API keys
  // open nothing here. Replicas are told to send a heartbeat every
  // `heartbeat_interval`.
  LinkService(const WorkerToken* token, ReplicaRegistry* registry, absl::Duration heartbeat_interval);

  grpc::Status Connect(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<lathe::v1::CoordinatorMessage, lathe::v1::WorkerMessage>* stream)
      override;
  // The rendezvous store; the worker token opens it, as Connect.
  grpc::Status StoreSet(grpc::ServerContext* context, const lathe::v1::StoreSetRequest* request,
                        lathe::v1::StoreSetResponse* response) override;
  grpc::Status StoreGet(grpc::ServerContext* context, const lathe::v1::StoreGetRequest* request,
                        lathe::v1::StoreGetResponse* response) override;

 private:
  const WorkerToken* token_;
  ReplicaRegistry* registry_;
  const absl::Duration heartbeat_interval_;
  RendezvousStore store_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_LINK_SERVICE_H_
