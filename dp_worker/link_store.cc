// StoreSet / StoreGet over gRPC.
#include "dp_worker/link_store.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/str_cat.h"

namespace lathe::dp_worker {
namespace {

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

}  // namespace

LinkStore::LinkStore(const LinkOptions& options) : options_(options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_root_certs.empty()) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options.tls_root_certs;
    credentials = grpc::SslCredentials(ssl);
  }
  channel_ = grpc::CreateChannel(options.coordinator, credentials);
  stub_ = lathe::v1::ReplicaLink::NewStub(channel_);
}

// Waits for the coordinator to be reachable (wait_for_ready) up to
// connect_timeout, plus the time the call itself may take.
std::unique_ptr<grpc::ClientContext> LinkStore::Context(absl::Duration wait) const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->AddMetadata("lathe-worker-token", options_.worker_token);
  context->set_wait_for_ready(true);
  context->set_deadline(absl::ToChronoTime(absl::Now() + options_.connect_timeout + wait));
  return context;
}

absl::Status LinkStore::Set(int64_t generation, const std::string& key, const std::string& value) {
  lathe::v1::StoreSetRequest request;
  request.set_generation(generation);
  request.set_key(key);
  request.set_value(value);
  lathe::v1::StoreSetResponse response;
  auto context = Context(absl::ZeroDuration());
  return FromGrpc(stub_->StoreSet(context.get(), request, &response),
                  absl::StrCat("store set of ", key, " at ", options_.coordinator));
}

absl::StatusOr<std::vector<std::string>> LinkStore::Get(int64_t generation, const std::vector<std::string>& keys,
                                                        absl::Duration timeout) {
  lathe::v1::StoreGetRequest request;
  request.set_generation(generation);
  for (const std::string& k : keys) request.add_keys(k);
  request.set_timeout_ms(absl::ToInt64Milliseconds(timeout));
  lathe::v1::StoreGetResponse response;
  auto context = Context(timeout);
  if (absl::Status s = FromGrpc(stub_->StoreGet(context.get(), request, &response),
                                absl::StrCat("store get at ", options_.coordinator));
      !s.ok()) {
    return s;
  }
  if (response.values_size() != static_cast<int>(keys.size())) {
    return absl::InternalError(
        absl::StrCat("store get: ", response.values_size(), " values for ", keys.size(), " keys"));
  }
  return std::vector<std::string>(response.values().begin(), response.values().end());
}

}  // namespace lathe::dp_worker
