// Symlink-free walks and opens with lstat and openat(O_NOFOLLOW).
#include "coordinator/checkpoint_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/saturating.h"
#include "core/status.h"

namespace lathe::coordinator {
namespace {

namespace fs = std::filesystem;

bool Lstat(const fs::path& path, struct stat* st) { return ::lstat(path.c_str(), st) == 0; }

int64_t UnixMillis(const struct timespec& t) {
  return runtime::SaturatingAdd(runtime::SaturatingMul(static_cast<int64_t>(t.tv_sec), 1000), t.tv_nsec / 1000000);
}

}  // namespace

bool IsRealDirectory(const fs::path& path) {
  struct stat st;
  return Lstat(path, &st) && S_ISDIR(st.st_mode);
}

bool IsRealFile(const fs::path& path) {
  struct stat st;
  return Lstat(path, &st) && S_ISREG(st.st_mode);
}

std::vector<lathe::v1::CheckpointFile> ListRealFiles(const fs::path& folder) {
  std::vector<lathe::v1::CheckpointFile> files;
  std::error_code ec;
  // The iterator's default options do not descend into links to folders.
  fs::recursive_directory_iterator it(folder, fs::directory_options::none, ec);
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    struct stat st;
    if (!Lstat(it->path(), &st) || !S_ISREG(st.st_mode)) continue;
    // Lexically: fs::relative would resolve links and name their targets.
    const std::string rel = it->path().lexically_relative(folder).generic_string();
    lathe::v1::CheckpointFile file;
    file.set_relative_file_name(rel);
    int node = -1;
    if (rel.rfind("node_rank-", 0) == 0 && !absl::SimpleAtoi(rel.substr(10, rel.find('/') - 10), &node)) node = -1;
    file.set_node_rank(node);
    file.set_size_bytes(static_cast<int64_t>(st.st_size));
    file.set_last_modified_unix_ms(UnixMillis(st.st_mtim));
    files.push_back(std::move(file));
  }
  std::sort(files.begin(), files.end(),
            [](const auto& a, const auto& b) { return a.relative_file_name() < b.relative_file_name(); });
  return files;
}

FileHandle::~FileHandle() {
  if (fd_ >= 0) ::close(fd_);
}

FileHandle& FileHandle::operator=(FileHandle&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.release();
  }
  return *this;
}

namespace {

// Opens root/parts[0]/.../parts[n-1] one part at a time beneath `root`,
// following no link; the last part a regular file when `file`, else a folder.
absl::StatusOr<FileHandle> OpenPartsBeneath(const std::string& root, const std::vector<std::string>& parts,
                                            bool file) {
  FileHandle dir(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open the checkpoint root: ", std::strerror(errno)));
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    const bool last = file && i + 1 == parts.size();
    // O_NOFOLLOW fails a link with ELOOP; O_DIRECTORY fails anything else
    // that is not a folder.
    const int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | (last ? O_NONBLOCK : O_DIRECTORY);
    FileHandle next(::openat(dir.get(), parts[i].c_str(), flags));
    if (next.get() < 0) {
      return absl::NotFoundError(errno == ELOOP ? "a path part is a symbolic link" : std::strerror(errno));
    }
    dir = std::move(next);
  }
  if (!file) return dir;
  struct stat st;
  // O_NONBLOCK above keeps a FIFO from blocking the open; only regular files are served.
  if (::fstat(dir.get(), &st) != 0 || !S_ISREG(st.st_mode)) return absl::NotFoundError("not a regular file");
  return dir;
}

// Removes `name` in the open folder `parent` and, for a folder, everything
// in it, through the open folders themselves: no path is resolved again, so a
// folder swapped for a link meanwhile cannot redirect the removal.
absl::Status RemoveTreeAt(int parent, const std::string& name) {
  FileHandle dir(::openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (dir.get() < 0) {
    if (errno == ENOENT) return absl::OkStatus();
    // A file, or a link (never followed): unlink the entry itself.
    if ((errno == ENOTDIR || errno == ELOOP) && (::unlinkat(parent, name.c_str(), 0) == 0 || errno == ENOENT)) {
      return absl::OkStatus();
    }
    return absl::InternalError(absl::StrCat("cannot remove ", name, ": ", std::strerror(errno)));
  }
  std::vector<std::string> entries;
  if (DIR* d = ::fdopendir(::dup(dir.get())); d != nullptr) {
    while (const dirent* e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) entries.emplace_back(e->d_name);
    }
    ::closedir(d);
  }
  for (const std::string& entry : entries) LATHE_RETURN_IF_ERROR(RemoveTreeAt(dir.get(), entry));
  if (::unlinkat(parent, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT) {
    return absl::InternalError(absl::StrCat("cannot remove ", name, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FileHandle> OpenBeneath(const std::string& root, const std::vector<std::string>& parts) {
  return OpenPartsBeneath(root, parts, /*file=*/true);
}

absl::Status RemoveBeneath(const std::string& root, const std::vector<std::string>& folder, const std::string& name) {
  LATHE_ASSIGN_OR_RETURN(FileHandle dir, OpenPartsBeneath(root, folder, /*file=*/false));
  // Renamed first, so a concurrent listing never sees a half-removed folder;
  // a ".replaced" left by a removal that died goes first.
  const std::string doomed = name + ".replaced";
  LATHE_RETURN_IF_ERROR(RemoveTreeAt(dir.get(), doomed));
  if (::renameat(dir.get(), name.c_str(), dir.get(), doomed.c_str()) != 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(name, " is gone"));
    return absl::InternalError(absl::StrCat("cannot remove ", name, ": ", std::strerror(errno)));
  }
  return RemoveTreeAt(dir.get(), doomed);
}

absl::StatusOr<std::string> ReadAll(const FileHandle& file, int64_t max_bytes) {
  std::string out;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(file.get(), buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat("read failed: ", std::strerror(errno)));
    if (n == 0) return out;
    if (static_cast<int64_t>(out.size()) + n > max_bytes) {
      return absl::DataLossError(absl::StrCat("larger than ", max_bytes, " bytes"));
    }
    out.append(buffer, static_cast<size_t>(n));
  }
}

}  // namespace lathe::coordinator
