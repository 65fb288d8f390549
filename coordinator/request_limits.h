// Bounds on the identifiers clients send (run ids, op ids, page tokens, file
// names, model names), checked before anything else looks at them, so no
// lookup, path or error message ever holds more than a bounded amount of
// client text.
#ifndef LATHE_COORDINATOR_REQUEST_LIMITS_H_
#define LATHE_COORDINATOR_REQUEST_LIMITS_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lathe::coordinator {

// "<run_id>/<seq_id>": a 128-byte run id, '/', up to 19 digits.
inline constexpr size_t kMaxOpIdBytes = 160;
// A checkpoint file's name relative to its checkpoint folder.
inline constexpr size_t kMaxRelativeFileNameBytes = 1024;
// A decimal file index (GetCheckpointFiles' page_token).
inline constexpr size_t kMaxPageTokenBytes = 10;
// CreateRun's base_model.
inline constexpr size_t kMaxBaseModelBytes = 256;
// Longest status message the coordinator sends; longer ones are cut.
inline constexpr size_t kMaxStatusMessageBytes = 2048;

// InvalidArgument unless `run_id` is 1-128 bytes of [A-Za-z0-9._:-] (the
// checkpoint name rules plus ':', runtime::ValidateRunName: run ids are folder
// names under the checkpoint root).
absl::Status ValidateRunId(absl::string_view run_id);
// InvalidArgument unless `op_id` is 1-kMaxOpIdBytes bytes of [A-Za-z0-9._:-/].
// Any op id that passes may still be unknown (NotFound from the ledger).
absl::Status ValidateOpId(absl::string_view op_id);
// InvalidArgument unless `name` is at most kMaxBaseModelBytes of printable
// ASCII (empty: the deployment's model).
absl::Status ValidateBaseModel(absl::string_view name);
// The index a GetCheckpointFiles page starts at: 0 for an empty token, else
// the token's value, which must be decimal digits only, at most
// kMaxPageTokenBytes of them, and at most `total` (the number of files).
// InvalidArgument otherwise.
absl::StatusOr<int64_t> ParsePageToken(absl::string_view token, int64_t total);
// InvalidArgument unless `name` is a relative path of at most
// kMaxRelativeFileNameBytes: '/'-separated components, none empty, "." or
// "..", no leading '/', no NUL or other control byte.
absl::Status ValidateRelativeFileName(absl::string_view name);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_REQUEST_LIMITS_H_
