// lathe.v1.Lathe over gRPC: reads the key and the request, asks the FrontEnd.
#include "coordinator/lathe_service.h"

#include <google/protobuf/descriptor.h>

#include "absl/strings/str_cat.h"
#include "coordinator/request_limits.h"
#include "core/quote.h"
#include "core/status.h"

namespace lathe::coordinator {
namespace {

// Every status message goes through here, so none, whatever it quotes,
// exceeds kMaxStatusMessageBytes.
grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()),
                      runtime::TruncateMessage(s.message(), kMaxStatusMessageBytes));
}

// The value of the call's "authorization" metadata; empty when absent.
absl::string_view Authorization(const grpc::ServerContext& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return {};
  return absl::string_view(it->second.data(), it->second.size());
}

// The index gRPC gives a method: its position in the service's descriptor.
int MethodIndex(const char* method) {
  const google::protobuf::ServiceDescriptor* service =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(lathe::v1::Lathe::service_full_name());
  LATHE_CHECK(service != nullptr && service->FindMethodByName(method) != nullptr);
  return service->FindMethodByName(method)->index();
}

// The one request of a call could not be read: the client sent none, or its
// bytes do not parse as the method's message. (When the transport itself
// ended the call, e.g. past the receive limit, its status stands.)
grpc::Status NoRequest(const char* method) {
  return {grpc::StatusCode::INVALID_ARGUMENT,
          absl::StrCat("the request of /lathe.v1.Lathe/", method, " is missing or does not parse as its message")};
}

}  // namespace

LatheService::LatheService(FrontEnd* front_end) : front_end_(front_end) {
  ReadAfterKeyCheck("GetCapabilities", &LatheService::GetCapabilities);
  ReadAfterKeyCheck("GetInfo", &LatheService::GetInfo);
  ReadAfterKeyCheck("CreateRun", &LatheService::CreateRun);
  ReadAfterKeyCheck("Submit", &LatheService::Submit);
  ReadAfterKeyCheck("Retrieve", &LatheService::Retrieve);
  ReadAfterKeyCheck("ListCheckpoints", &LatheService::ListCheckpoints);
  ReadAfterKeyCheck("GetCheckpointFiles", &LatheService::GetCheckpointFiles);
  ReadAfterKeyCheck("DeleteCheckpoint", &LatheService::DeleteCheckpoint);
  using Request = lathe::v1::DownloadCheckpointFileRequest;
  using Chunk = lathe::v1::FileChunk;
  auto download = [this](grpc::ServerContext* context, grpc::ServerSplitStreamer<Request, Chunk>* stream) {
    // Before Read: nothing of the request is read for a caller without a key.
    if (absl::Status s = front_end_->Authorize(Authorization(*context)); !s.ok()) return ToGrpc(s);
    Request request;
    if (!stream->Read(&request)) return NoRequest("DownloadCheckpointFile");
    return ToGrpc(front_end_->DownloadCheckpointFile(Authorization(*context), request,
                                                     [stream](const Chunk& chunk) { return stream->Write(chunk); }));
  };
  MarkMethodStreamed(MethodIndex("DownloadCheckpointFile"),
                     new grpc::internal::SplitServerStreamingHandler<Request, Chunk>(download));
}

template <class Request, class Response>
void LatheService::ReadAfterKeyCheck(
    const char* method, grpc::Status (LatheService::*handler)(grpc::ServerContext*, const Request*, Response*)) {
  auto unary = [this, handler, method](grpc::ServerContext* context,
                                       grpc::ServerUnaryStreamer<Request, Response>* stream) {
    // Before Read: nothing of the request is read for a caller without a key.
    if (absl::Status s = front_end_->Authorize(Authorization(*context)); !s.ok()) return ToGrpc(s);
    Request request;
    if (!stream->Read(&request)) return NoRequest(method);
    Response response;
    grpc::Status s = (this->*handler)(context, &request, &response);
    if (s.ok()) stream->Write(response);
    return s;
  };
  MarkMethodStreamed(MethodIndex(method), new grpc::internal::StreamedUnaryHandler<Request, Response>(unary));
}

grpc::Status LatheService::GetCapabilities(grpc::ServerContext* context, const lathe::v1::GetCapabilitiesRequest*,
                                           lathe::v1::Capabilities* response) {
  return ToGrpc(front_end_->GetCapabilities(Authorization(*context), response));
}

grpc::Status LatheService::Health(grpc::ServerContext*, const lathe::v1::HealthRequest*,
                                  lathe::v1::HealthResponse* response) {
  front_end_->Health(response);
  return grpc::Status::OK;
}

grpc::Status LatheService::GetInfo(grpc::ServerContext* context, const lathe::v1::GetInfoRequest* request,
                                   lathe::v1::RunInfo* response) {
  return ToGrpc(front_end_->GetInfo(Authorization(*context), *request, response));
}

grpc::Status LatheService::CreateRun(grpc::ServerContext* context, const lathe::v1::CreateRunRequest* request,
                                     lathe::v1::CreateRunResponse* response) {
  return ToGrpc(front_end_->CreateRun(Authorization(*context), *request, response));
}

grpc::Status LatheService::Submit(grpc::ServerContext* context, const lathe::v1::SubmitRequest* request,
                                  lathe::v1::SubmitResponse* response) {
  return ToGrpc(front_end_->Submit(Authorization(*context), *request, response));
}

grpc::Status LatheService::Retrieve(grpc::ServerContext* context, const lathe::v1::RetrieveRequest* request,
                                    lathe::v1::RetrieveResponse* response) {
  // Never hold a poll past the caller's own deadline (none: time_point::max).
  absl::Time deadline = absl::InfiniteFuture();
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    deadline = absl::FromChrono(context->deadline());
  }
  return ToGrpc(front_end_->Retrieve(Authorization(*context), *request, deadline, response));
}

grpc::Status LatheService::ListCheckpoints(grpc::ServerContext* context,
                                           const lathe::v1::ListCheckpointsRequest* request,
                                           lathe::v1::ListCheckpointsResponse* response) {
  return ToGrpc(front_end_->ListCheckpoints(Authorization(*context), *request, response));
}

grpc::Status LatheService::GetCheckpointFiles(grpc::ServerContext* context,
                                              const lathe::v1::GetCheckpointFilesRequest* request,
                                              lathe::v1::GetCheckpointFilesResponse* response) {
  return ToGrpc(front_end_->GetCheckpointFiles(Authorization(*context), *request, response));
}

grpc::Status LatheService::DeleteCheckpoint(grpc::ServerContext* context,
                                            const lathe::v1::DeleteCheckpointRequest* request,
                                            lathe::v1::DeleteCheckpointResponse*) {
  return ToGrpc(front_end_->DeleteCheckpoint(Authorization(*context), *request));
}

}  // namespace lathe::coordinator
