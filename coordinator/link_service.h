// lathe.v1.ReplicaLink: one Connect stream per replica leader, feeding the
// registry (registration, heartbeats, answers, departure).
#ifndef LATHE_COORDINATOR_LINK_SERVICE_H_
#define LATHE_COORDINATOR_LINK_SERVICE_H_

#include "coordinator/auth.h"
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

 private:
  const WorkerToken* token_;
  ReplicaRegistry* registry_;
  const absl::Duration heartbeat_interval_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_LINK_SERVICE_H_
