// Framing, checksums, durable appends and atomic rewrites of the journal.
#include "coordinator/journal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/crc32c.h"
#include "core/log.h"

namespace lathe::coordinator {
namespace {

// A record larger than this is corruption, not data: the largest request
// the coordinator accepts is 2 GiB, and results are bounded by requests.
constexpr uint32_t kMaxRecordBytes = uint32_t{1} << 31;

absl::Status OsError(const std::string& what, const std::string& path) {
  const int err = errno;
  std::string message = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  return absl::InternalError(message);
}

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

uint32_t Checksum(absl::string_view payload) { return runtime::Crc32c(payload.data(), payload.size()); }

std::string Frame(const lathe::v1::JournalRecord& record) {
  std::string payload;
  record.SerializeToString(&payload);
  std::string frame;
  frame.reserve(payload.size() + 8);
  PutU32(frame, static_cast<uint32_t>(payload.size()));
  PutU32(frame, Checksum(payload));
  frame += payload;
  return frame;
}

absl::Status WriteAll(int fd, const std::string& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return OsError("cannot write", path);
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadAll(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::string();
    return OsError("cannot open", path);
  }
  std::string data;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      absl::Status s = OsError("cannot read", path);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    data.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return data;
}

absl::Status SyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return OsError("cannot open folder", dir);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return OsError("cannot sync folder", dir);
  return absl::OkStatus();
}

}  // namespace


absl::StatusOr<std::unique_ptr<Journal>> Journal::Open(const std::string& dir,
                                                       std::vector<lathe::v1::JournalRecord>* records) {
  if (dir.empty()) return absl::InvalidArgumentError("the journal folder is empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create journal folder ", dir, ": ", ec.message()));
  std::unique_ptr<Journal> journal(new Journal());
  journal->dir_ = dir;
  journal->path_ = (std::filesystem::path(dir) / "journal.log").string();
  absl::StatusOr<std::string> data = ReadAll(journal->path_);
  if (!data.ok()) return data.status();
  // Intact frames up to the first short or corrupt one.
  size_t at = 0;
  while (data->size() - at >= 8) {
    const uint32_t length = GetU32(data->data() + at);
    const uint32_t crc = GetU32(data->data() + at + 4);
    if (length >= kMaxRecordBytes || data->size() - at - 8 < length) break;
    absl::string_view payload(data->data() + at + 8, length);
    lathe::v1::JournalRecord record;
    if (Checksum(payload) != crc || !record.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) break;
    records->push_back(std::move(record));
    at += 8 + length;
  }
  const int fd = ::open(journal->path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return OsError("cannot open", journal->path_);
  if (at != data->size()) {
    LATHE_LOG(Warning, "journal %s: dropped a torn or corrupt tail of %d bytes after %d intact records",
              journal->path_, data->size() - at, records->size());
    if (::ftruncate(fd, static_cast<off_t>(at)) != 0 || ::fdatasync(fd) != 0) {
      absl::Status s = OsError("cannot truncate", journal->path_);
      ::close(fd);
      return s;
    }
  }
  if (::lseek(fd, static_cast<off_t>(at), SEEK_SET) < 0) {
    absl::Status s = OsError("cannot seek", journal->path_);
    ::close(fd);
    return s;
  }
  absl::MutexLock lock(&journal->mu_);
  journal->fd_ = fd;
  journal->bytes_ = journal->bytes_at_rewrite_ = static_cast<int64_t>(at);
  return journal;
}

Journal::~Journal() {
  absl::MutexLock lock(&mu_);
  if (fd_ >= 0) ::close(fd_);
}

absl::Status Journal::Append(const lathe::v1::JournalRecord& record) {
  absl::StatusOr<int64_t> mark = Write(record);
  if (!mark.ok()) return mark.status();
  return Sync(*mark);
}

absl::StatusOr<int64_t> Journal::Write(const lathe::v1::JournalRecord& record) {
  const std::string frame = Frame(record);
  if (frame.size() - 8 >= kMaxRecordBytes) {
    return absl::ResourceExhaustedError(absl::StrCat("a journal record of ", frame.size() - 8, " bytes is too large"));
  }
  absl::MutexLock lock(&mu_);
  if (absl::Status s = WriteAll(fd_, frame, path_); !s.ok()) {
    // A partial frame would hide every later record: cut it off again.
    if (::ftruncate(fd_, static_cast<off_t>(bytes_)) == 0) ::lseek(fd_, static_cast<off_t>(bytes_), SEEK_SET);
    return s;
  }
  bytes_ += static_cast<int64_t>(frame.size());
  written_ += static_cast<int64_t>(frame.size());
  return written_;
}

absl::Status Journal::Sync(int64_t mark) {
  absl::MutexLock sync_lock(&sync_mu_);
  int fd = -1;
  int64_t target = 0;
  {
    absl::MutexLock lock(&mu_);
    if (synced_ >= mark) return absl::OkStatus();  // a sync that covered it ran meanwhile
    fd = fd_;
    target = written_;
  }
  // Outside mu_: appends go on while the disk syncs; the next Sync covers them.
  if (::fdatasync(fd) != 0) return OsError("cannot sync", path_);
  absl::MutexLock lock(&mu_);
  synced_ = std::max(synced_, target);
  return absl::OkStatus();
}

absl::Status Journal::Rewrite(const std::vector<lathe::v1::JournalRecord>& records) {
  absl::MutexLock sync_lock(&sync_mu_);  // the file a Sync holds stays open
  absl::MutexLock lock(&mu_);            // no append may land in the old file meanwhile
  std::string bytes;
  for (const auto& record : records) bytes += Frame(record);
  const std::string tmp = path_ + ".new";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return OsError("cannot create", tmp);
  absl::Status s = WriteAll(fd, bytes, tmp);
  if (s.ok() && ::fsync(fd) != 0) s = OsError("cannot sync", tmp);
  if (s.ok() && ::rename(tmp.c_str(), path_.c_str()) != 0) s = OsError("cannot rename over", path_);
  if (!s.ok()) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  if (::lseek(fd, 0, SEEK_END) < 0) {
    s = OsError("cannot seek", path_);
    ::close(fd);
    return s;
  }
  ::close(fd_);
  fd_ = fd;
  bytes_ = bytes_at_rewrite_ = static_cast<int64_t>(bytes.size());
  synced_ = written_;  // what was written before is in the synced new file, or dropped
  return SyncDir(dir_);
}

int64_t Journal::bytes() const {
  absl::MutexLock lock(&mu_);
  return bytes_;
}

int64_t Journal::bytes_at_rewrite() const {
  absl::MutexLock lock(&mu_);
  return bytes_at_rewrite_;
}

}  // namespace lathe::coordinator
