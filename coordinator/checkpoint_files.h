// Reading checkpoint folders without following symbolic links: a link inside
// the checkpoint root (planted there or left by a tool) must never make a
// file outside a checkpoint's folder listed, served, read or deleted.
//
// Policy: the checkpoint root itself may be a link (the operator chose it);
// nothing beneath it is followed. A run, kind or checkpoint folder that is a
// link is not a checkpoint; a link inside a checkpoint is neither listed nor
// served. Thread-compatible free functions.
#ifndef LATHE_COORDINATOR_CHECKPOINT_FILES_H_
#define LATHE_COORDINATOR_CHECKPOINT_FILES_H_

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lathe/v1/service.pb.h"

namespace lathe::coordinator {

// Whether `path` is a directory, or a regular file, itself: false for a
// symbolic link to one, for anything missing and on any error.
bool IsRealDirectory(const std::filesystem::path& path);
bool IsRealFile(const std::filesystem::path& path);

// The regular files under `folder` (recursively), named relative to it and
// sorted by name, with size and modification time. Symbolic links, whether to
// files or folders, and anything neither a regular file nor a folder are
// skipped; links to folders are not descended into. REQUIRES: `folder` is a
// real directory (IsRealDirectory).
std::vector<lathe::v1::CheckpointFile> ListRealFiles(const std::filesystem::path& folder);

// An open file descriptor, closed when it goes.
class FileHandle {
 public:
  explicit FileHandle(int fd = -1) : fd_(fd) {}
  ~FileHandle();
  FileHandle(FileHandle&& other) noexcept : fd_(other.release()) {}
  FileHandle& operator=(FileHandle&& other) noexcept;
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;
  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// Opens the regular file root/parts[0]/.../parts[n-1] for reading, one part
// at a time beneath `root` (which is followed), refusing to follow a link at
// any part, so what is opened lies inside `root` whatever changes meanwhile.
// NotFound when a part is missing, a link, or of the wrong type (the last a
// regular file, the others folders). REQUIRES: no part is empty, "." or "..".
absl::StatusOr<FileHandle> OpenBeneath(const std::string& root, const std::vector<std::string>& parts);

// Removes root/folder[0]/.../name (a folder and everything in it, or a
// file), opening the folders one part at a time beneath `root` and removing
// through the open folders, so nothing outside `root` is touched whatever is
// swapped meanwhile: the entry is first renamed to "<name>.replaced" (one
// left by a removal that died is removed first), then removed. Links inside
// are removed, never followed. NotFound when a folder part is missing or a
// link, or `name` is gone; Internal for other I/O errors.
absl::Status RemoveBeneath(const std::string& root, const std::vector<std::string>& folder, const std::string& name);

// Up to `max_bytes` of an open file from its start; DataLoss when it holds
// more or cannot be read.
absl::StatusOr<std::string> ReadAll(const FileHandle& file, int64_t max_bytes);

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_CHECKPOINT_FILES_H_
