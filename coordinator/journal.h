// The coordinator's journal: an append-only file of checksummed records
// (lathe.v1.JournalRecord) that outlives the process, so a coordinator killed
// at any moment restarts with its runs, accepted operations and results.
//
// On disk, <dir>/journal.log is a sequence of frames: a little-endian uint32
// payload length, a little-endian uint32 CRC32C of the payload (core/crc32c.h), the payload.
// Every Append is written and fdatasync'ed before it returns. A frame that is
// cut short or whose checksum does not match (a write torn by kill -9 or a
// power loss) ends the log: Open drops it and everything after it.
//
// Thread-safe.
#ifndef LATHE_COORDINATOR_JOURNAL_H_
#define LATHE_COORDINATOR_JOURNAL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "lathe/v1/journal.pb.h"

namespace lathe::coordinator {

class Journal {
 public:
  // Opens <dir>/journal.log (creating `dir` and the file), reads every intact
  // record into *records and truncates a torn or corrupt tail (logging how
  // many bytes it dropped). InvalidArgument for an empty dir; the OS error
  // (as Internal or PermissionDenied) when the folder or file cannot be made.
  static absl::StatusOr<std::unique_ptr<Journal>> Open(const std::string& dir,
                                                       std::vector<lathe::v1::JournalRecord>* records);
  ~Journal();
  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  // Appends one record durably (Write, then Sync). Internal with the OS
  // error when the write or the sync fails (the record may then be missing
  // after a restart).
  absl::Status Append(const lathe::v1::JournalRecord& record);
  // Writes one record (it survives the process, not yet a machine crash)
  // and returns a mark for Sync. Internal with the OS error.
  absl::StatusOr<int64_t> Write(const lathe::v1::JournalRecord& record);
  // Makes every record written up to `mark` durable (fdatasync). Callers
  // waiting at once share one sync (group commit); a mark already synced
  // returns at once. Internal with the OS error.
  absl::Status Sync(int64_t mark);
  // Replaces the log by `records` (compaction): written to a new file, synced,
  // renamed over the log and the folder synced, so a crash leaves either the
  // old log or the new one. On failure the old log stays in use.
  absl::Status Rewrite(const std::vector<lathe::v1::JournalRecord>& records);

  // Bytes in the log now, and right after the last Open or Rewrite.
  int64_t bytes() const;
  int64_t bytes_at_rewrite() const;
  const std::string& path() const { return path_; }

 private:
  Journal() = default;

  std::string dir_;
  std::string path_;
  absl::Mutex sync_mu_;  // one sync (or rewrite) at a time; before mu_
  mutable absl::Mutex mu_;
  int fd_ ABSL_GUARDED_BY(mu_) = -1;
  int64_t written_ ABSL_GUARDED_BY(mu_) = 0;  // bytes ever written (marks)
  int64_t synced_ ABSL_GUARDED_BY(mu_) = 0;   // marks up to here are durable
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_at_rewrite_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_JOURNAL_H_
