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
  // Neither owned; both outlive the service. Replicas are told to send a
  // heartbeat every `heartbeat_interval`.
  LinkService(const ApiKeys* keys, ReplicaRegistry* registry, absl::Duration heartbeat_interval);

  grpc::Status Connect(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<lathe::v1::CoordinatorMessage, lathe::v1::WorkerMessage>* stream)
      override;

 private:
  const ApiKeys* keys_;
  ReplicaRegistry* registry_;
  const absl::Duration heartbeat_interval_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_LINK_SERVICE_H_
