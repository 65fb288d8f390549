// The coordinator's end of a replica's stream.
#include "coordinator/link_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/request_limits.h"
#include "core/log.h"
#include "core/quote.h"

namespace lathe::coordinator {
namespace {

using Stream = grpc::ServerReaderWriter<lathe::v1::CoordinatorMessage, lathe::v1::WorkerMessage>;

// Writes from the dispatcher and the registry, one at a time.
class StreamSink : public ReplicaSink {
 public:
  StreamSink(grpc::ServerContext* context, Stream* stream) : context_(context), stream_(stream) {}
  bool Send(const lathe::v1::CoordinatorMessage& message) override {
    absl::MutexLock lock(&mu_);
    return stream_->Write(message);
  }
  void Cancel() override { context_->TryCancel(); }

 private:
  grpc::ServerContext* context_;
  Stream* stream_;
  absl::Mutex mu_;
};

}  // namespace

LinkService::LinkService(const WorkerToken* token, ReplicaRegistry* registry, absl::Duration heartbeat_interval)
    : token_(token), registry_(registry), heartbeat_interval_(heartbeat_interval) {}

grpc::Status LinkService::Connect(grpc::ServerContext* context, Stream* stream) {
  // Checked on the metadata alone: a stream method's messages are read only
  // when asked for, so a caller without the token gets nothing read.
  if (grpc::Status s = token_->Check(*context); !s.ok()) {
    LATHE_LOG(Warning, "ReplicaLink refused from %s: %s", context->peer(), s.error_message());
    return s;
  }
  lathe::v1::WorkerMessage message;
  if (!stream->Read(&message) || !message.has_register_()) {
    return {grpc::StatusCode::INVALID_ARGUMENT, "the first message must register the replica"};
  }
  const int replica = message.register_().replica();
  if (!message.register_().refused().empty()) {
    const std::string why = runtime::TruncateMessage(message.register_().refused(), 1024);
    LATHE_LOG(Error, "replica %d refused to start: %s", replica, why);
    registry_->Refused(replica, why);
    return {grpc::StatusCode::FAILED_PRECONDITION, "the refusal is recorded"};
  }
  StreamSink sink(context, stream);
  if (absl::Status s = registry_->Register(message.register_(), &sink); !s.ok()) {
    return grpc::Status(static_cast<grpc::StatusCode>(s.code()),
                        runtime::TruncateMessage(s.message(), kMaxStatusMessageBytes));
  }
  LATHE_LOG(Info, "replica %d registered from %s (pid %d)%s", replica, message.register_().host(),
            message.register_().pid(),
            message.register_().rejoin()
                ? absl::StrCat(" again, with its runs and ", message.register_().kept_size(), " kept answer(s)")
                : "");
  lathe::v1::CoordinatorMessage welcome;
  welcome.mutable_registered()->set_heartbeat_interval_ms(absl::ToInt64Milliseconds(heartbeat_interval_));
  sink.Send(welcome);
  std::string reason = "stream broken";
  while (stream->Read(&message)) {
    if (message.has_result()) {
      registry_->Deliver(replica, message.result());
    } else if (message.has_deregister()) {
      // The reason ends up in Health's detail and in every error while lost.
      reason = absl::StrCat("deregistered: ", runtime::TruncateMessage(message.deregister().reason(), 512));
      break;
    } else {
      registry_->Heard(replica);
    }
  }
  if (context->IsCancelled() && reason == "stream broken") reason = "stream cancelled";
  LATHE_LOG(Warning, "replica %d: %s", replica, reason);
  registry_->Disconnected(replica, reason);
  return grpc::Status::OK;
}

namespace {
grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()),
                      runtime::TruncateMessage(s.message(), kMaxStatusMessageBytes));
}
}  // namespace

grpc::Status LinkService::StoreSet(grpc::ServerContext* context, const lathe::v1::StoreSetRequest* request,
                                   lathe::v1::StoreSetResponse* /*response*/) {
  if (grpc::Status s = token_->Check(*context); !s.ok()) return s;
  return ToGrpc(store_.Set(request->generation(), request->key(), request->value()));
}

grpc::Status LinkService::StoreGet(grpc::ServerContext* context, const lathe::v1::StoreGetRequest* request,
                                   lathe::v1::StoreGetResponse* response) {
  if (grpc::Status s = token_->Check(*context); !s.ok()) return s;
  // Waits no longer than the caller does, and ends when the call is
  // cancelled (a server shutting down cancels its calls but waits for
  // their handlers).
  absl::Duration timeout = absl::Milliseconds(request->timeout_ms());
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    timeout = std::min(timeout, absl::FromChrono(context->deadline()) - absl::Now());
  }
  auto values = store_.Get(request->generation(),
                           std::vector<std::string>(request->keys().begin(), request->keys().end()), timeout,
                           [context] { return context->IsCancelled(); });
  if (!values.ok()) return ToGrpc(values.status());
  for (std::string& v : *values) response->add_values(std::move(v));
  return grpc::Status::OK;
}

}  // namespace lathe::coordinator
