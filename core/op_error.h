// Conversions between absl::Status and the wire's OpError (an operation's
// failure as Retrieve reports it), shared by the dp_worker and the coordinator.
#ifndef LATHE_CORE_OP_ERROR_H_
#define LATHE_CORE_OP_ERROR_H_

#include "absl/status/status.h"
#include "lathe/v1/service.pb.h"

namespace lathe::runtime {

// USER for codes that say the request itself is wrong (InvalidArgument,
// NotFound, AlreadyExists, FailedPrecondition, OutOfRange, Unimplemented,
// PermissionDenied, Unauthenticated, DeadlineExceeded of an ordering wait is
// set explicitly by its maker); SERVER for the rest.
lathe::v1::OpError OpErrorFromStatus(const absl::Status& status);
lathe::v1::OpError MakeOpError(lathe::v1::OpError::Category category, absl::StatusCode code,
                               const std::string& message);
absl::Status StatusFromOpError(const lathe::v1::OpError& error);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_OP_ERROR_H_
