// The worker's end of the deployment's rendezvous store: StoreSet / StoreGet
// calls on the coordinator's replica link, with the worker token (and TLS)
// of the link. Any rank may use it, not only a replica's leader.
#ifndef LATHE_DP_WORKER_LINK_STORE_H_
#define LATHE_DP_WORKER_LINK_STORE_H_

#include <memory>

#include "dp_worker/replica_link.h"
#include "parallel/rendezvous_store.h"

namespace lathe::dp_worker {

class LinkStore : public parallel::RendezvousStore {
 public:
  // Uses options.coordinator, worker_token and tls_root_certs; a call waits
  // up to options.connect_timeout for an unreachable coordinator
  // (Unavailable after it). The channel connects lazily.
  explicit LinkStore(const LinkOptions& options);

  absl::Status Set(int64_t generation, const std::string& key, const std::string& value) override;
  absl::StatusOr<std::vector<std::string>> Get(int64_t generation, const std::vector<std::string>& keys,
                                               absl::Duration timeout) override;

 private:
  std::unique_ptr<grpc::ClientContext> Context(absl::Duration wait) const;

  LinkOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<lathe::v1::ReplicaLink::Stub> stub_;
};

}  // namespace lathe::dp_worker

#endif  // LATHE_DP_WORKER_LINK_STORE_H_
