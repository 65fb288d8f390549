// Status <-> OpError.
#include "core/op_error.h"

namespace lathe::runtime {

lathe::v1::OpError MakeOpError(lathe::v1::OpError::Category category, absl::StatusCode code,
                               const std::string& message) {
  lathe::v1::OpError error;
  error.set_category(category);
  error.set_code(static_cast<int>(code));
  error.set_message(message);
  return error;
}

lathe::v1::OpError OpErrorFromStatus(const absl::Status& status) {
  bool user = false;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
      user = true;
      break;
    default:
      break;
  }
  return MakeOpError(user ? lathe::v1::OpError::USER : lathe::v1::OpError::SERVER, status.code(),
                     std::string(status.message()));
}

absl::Status StatusFromOpError(const lathe::v1::OpError& error) {
  return absl::Status(static_cast<absl::StatusCode>(error.code()), error.message());
}

}  // namespace lathe::runtime
