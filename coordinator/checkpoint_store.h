// The committed checkpoints under a checkpoint root, as ListCheckpoints
// reports them. A folder counts only once its manifest is in place (save
// renames it into place last), so partial saves are never listed.
#ifndef LATHE_COORDINATOR_CHECKPOINT_STORE_H_
#define LATHE_COORDINATOR_CHECKPOINT_STORE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/service.pb.h"

namespace lathe::coordinator {

// Checkpoints of `run_id` (empty: of every run), newest first.
// FailedPrecondition without a root; InvalidArgument for a malformed run_id.
absl::StatusOr<std::vector<lathe::v1::Checkpoint>> ListCheckpoints(const std::string& root,
                                                                   const std::string& run_id);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_CHECKPOINT_STORE_H_
