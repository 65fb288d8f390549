// Checkpoint names and paths: lathe://<run_id>/weights/<name> and where such
// a checkpoint lives under a checkpoint root. Torch-free (the coordinator
// validates them at submit).
#ifndef LATHE_CORE_CHECKPOINT_PATH_H_
#define LATHE_CORE_CHECKPOINT_PATH_H_

#include <string>

#include "absl/status/statusor.h"

namespace lathe::runtime {

struct CheckpointRef {
  std::string run_id;
  std::string name;
  std::string kind = "weights";  // or "sampler_weights"
};

// InvalidArgument unless `name` is 1-128 characters of [A-Za-z0-9._-] not
// starting with '.' nor ending in .partial or .replaced (so no '/', '..',
// control characters, hidden folders or names of saves in progress).
// `what` names the field in the message.
absl::Status ValidateCheckpointName(const std::string& name, const std::string& what = "name");
// A run id: as ValidateCheckpointName, and ':' is allowed too (the Tinker
// door names runs "<session_id>:train:<model_seq_id>").
absl::Status ValidateRunName(const std::string& run_id, const std::string& what = "run_id");
// InvalidArgument unless `path` is lathe://<run_id>/weights/<name> (or, with
// `allow_sampler`, lathe://<run_id>/sampler_weights/<name>) with both parts
// valid (the run_id by ValidateRunName, the name by ValidateCheckpointName).
absl::StatusOr<CheckpointRef> ParseCheckpointPath(const std::string& path, bool allow_sampler = false);
std::string CheckpointUri(const CheckpointRef& ref);
// <root>/<run_id>/<kind>/<name>
std::string CheckpointDir(const std::string& root, const CheckpointRef& ref);

}  // namespace lathe::runtime

#endif  // LATHE_CORE_CHECKPOINT_PATH_H_
