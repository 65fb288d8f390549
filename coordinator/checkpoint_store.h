// The committed checkpoints under a checkpoint root (the folder the workers
// write to, reachable from the coordinator): listing, files, downloads,
// deletion and expiry. A training checkpoint counts once its manifest is in
// place and a sampler checkpoint once its adapter folder is (both are renamed
// into place last), so partial saves are never listed.
//
// Thread-safe (no state of its own beyond the root).
#ifndef LATHE_COORDINATOR_CHECKPOINT_STORE_H_
#define LATHE_COORDINATOR_CHECKPOINT_STORE_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lathe/v1/service.pb.h"

namespace lathe::coordinator {

class CheckpointStore {
 public:
  explicit CheckpointStore(std::string root) : root_(std::move(root)) {}

  // Checkpoints of `run_id` (empty: of every run), newest first.
  // FailedPrecondition without a root; InvalidArgument for a bad run_id.
  absl::StatusOr<std::vector<lathe::v1::Checkpoint>> List(const std::string& run_id) const;
  // One page of a checkpoint's files, sorted by name. NotFound for an
  // unknown checkpoint; InvalidArgument for a bad id or page token.
  absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> Files(const lathe::v1::GetCheckpointFilesRequest& request) const;
  // Calls `sink` with consecutive chunks of one file until it returns false
  // or the file ends. NotFound for an unknown checkpoint or file (names from
  // Files only; no path escapes the checkpoint).
  absl::Status Download(const std::string& checkpoint_id, const std::string& relative_file_name,
                        const std::function<bool(const lathe::v1::FileChunk&)>& sink) const;
  // NotFound for an unknown checkpoint.
  absl::Status Delete(const std::string& checkpoint_id) const;
  // Deletes every checkpoint whose expiry passed; returns how many.
  int Expire(absl::Time now) const;

 private:
  absl::StatusOr<std::string> Folder(const std::string& checkpoint_id) const;
  std::string root_;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_CHECKPOINT_STORE_H_
