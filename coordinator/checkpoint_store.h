// The committed checkpoints under a checkpoint root (the folder the workers
// write to, reachable from the coordinator): listing, files, downloads,
// deletion and expiry. A training checkpoint counts once its manifest is in
// place and a sampler checkpoint once its adapter folder is (both are renamed
// into place last), so partial saves are never listed.
//
// Nothing beneath the root is trusted: links are never followed (see
// coordinator/checkpoint_files.h), and a manifest (or a sampler checkpoint's
// lathe_sampler.json) that does not parse, is not lathe's, or holds a field
// of the wrong type makes its checkpoint corrupt: skipped by List and Expire,
// DataLoss where it is asked for by id. No content of the root can make a
// method throw or crash.
//
// Thread-safe.
#ifndef LATHE_COORDINATOR_CHECKPOINT_STORE_H_
#define LATHE_COORDINATOR_CHECKPOINT_STORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "coordinator/checkpoint_meta.h"
#include "lathe/v1/service.pb.h"
#include "core/checkpoint_path.h"

namespace lathe::coordinator {

// Largest manifest the coordinator reads; a larger one is corrupt.
inline constexpr int64_t kMaxManifestBytes = int64_t{256} << 20;

class CheckpointStore {
 public:
  explicit CheckpointStore(std::string root) : root_(std::move(root)) {}

  // Checkpoints of `run_id` (empty: of every run), newest first; corrupt ones
  // are left out (and logged once). FailedPrecondition without a root;
  // InvalidArgument for a bad run_id.
  absl::StatusOr<std::vector<lathe::v1::Checkpoint>> List(const std::string& run_id) const;
  // One page of a checkpoint's files, sorted by name. InvalidArgument for a
  // bad id or page token (see ParsePageToken); NotFound for an unknown
  // checkpoint; DataLoss for a corrupt one.
  absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> Files(
      const lathe::v1::GetCheckpointFilesRequest& request) const;
  // Calls `sink` with consecutive chunks of one file until it returns false
  // or the file ends. InvalidArgument for a bad id or file name (see
  // ValidateRelativeFileName); NotFound for an unknown checkpoint, or a name
  // that is not a regular file reached inside the checkpoint's folder without
  // following a link; DataLoss for a corrupt checkpoint.
  absl::Status Download(const std::string& checkpoint_id, const std::string& relative_file_name,
                        const std::function<bool(const lathe::v1::FileChunk&)>& sink) const;
  // Removes a checkpoint, corrupt or not. NotFound for an unknown checkpoint.
  absl::Status Delete(const std::string& checkpoint_id) const;
  // Deletes every checkpoint whose expiry passed; returns how many. Corrupt
  // checkpoints never expire.
  int Expire(absl::Time now) const;

 private:
  // A committed checkpoint's folder; what Locate checked: the id parses, the
  // run, kind and checkpoint folders are real directories (no links) and the
  // commit marker a regular file.
  struct Located {
    runtime::CheckpointRef ref;
    std::string folder;
  };
  absl::StatusOr<Located> Locate(const std::string& checkpoint_id) const;
  // Logs a corrupt checkpoint the first time this store meets it.
  void ReportCorrupt(const std::string& id, const absl::Status& status) const;
  // The checkpoint's times, read again only when its manifest (or sidecar)
  // changed since the last read: the expiry sweep runs every few seconds
  // and a large model's manifest is megabytes. Errors as ReadCheckpointMeta.
  absl::StatusOr<CheckpointMeta> Meta(const runtime::CheckpointRef& ref) const;
  // Forgets the cached times of checkpoints not in `live` (ids).
  void PruneMeta(const std::set<std::string>& live) const;

  // What Meta read, the file's identity then, and when (an entry is read
  // again after a minute whatever its identity: an in-place edit within the
  // file system's timestamp granularity keeps size, inode and mtime).
  struct CachedMeta {
    int64_t mtime_ns = 0, size = 0, inode = 0;
    absl::Time read_at;
    CheckpointMeta meta;
  };

  const std::string root_;
  mutable absl::Mutex mu_;
  mutable std::set<std::string> reported_ ABSL_GUARDED_BY(mu_);
  mutable std::map<std::string, CachedMeta> meta_cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_CHECKPOINT_STORE_H_
