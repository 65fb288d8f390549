// A gRPC server interceptor that answers a request that does not parse as its
// protobuf message with INVALID_ARGUMENT and a message naming the method.
// Without it the C++ server answers such a request INTERNAL with an empty
// message (the protobuf deserializer's status), which reads as a server bug.
#ifndef LATHE_COORDINATOR_PARSE_ERROR_INTERCEPTOR_H_
#define LATHE_COORDINATOR_PARSE_ERROR_INTERCEPTOR_H_

#include <grpcpp/support/server_interceptor.h>

#include <memory>

namespace lathe::coordinator {

// For ServerBuilder::experimental().SetInterceptorCreators. Applies to unary
// and server-streaming methods (one request message, parsed before the
// handler runs); a streaming read that fails to parse already reaches the
// handler as a failed Read.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeParseErrorInterceptorFactory();

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_PARSE_ERROR_INTERCEPTOR_H_
