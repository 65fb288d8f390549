// JSONL appends with O_APPEND and one write per line.
#include "coordinator/run_history.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <map>

#include "absl/strings/str_cat.h"
#include "coordinator/checkpoint_files.h"

namespace lathe::coordinator {

std::string RunHistory::PathOf(const std::string& run_id) const {
  return absl::StrCat(root_, "/", run_id, "/history.jsonl");
}

absl::Status RunHistory::Append(const std::string& run_id, const nlohmann::json& line) const {
  if (root_.empty()) return absl::OkStatus();
  const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  absl::MutexLock lock(&mu_);
  const std::string folder = absl::StrCat(root_, "/", run_id);
  if (::mkdir(folder.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::InternalError(absl::StrCat("cannot make the run folder ", folder, ": ", std::strerror(errno)));
  }
  if (!IsRealDirectory(folder)) return absl::InternalError(absl::StrCat(folder, " is not a folder (a link?)"));
  const std::string path = PathOf(run_id);
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot append to ", path, ": ", std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<nlohmann::json>> RunHistory::Read(const std::string& run_id, size_t max_lines) const {
  if (root_.empty()) return absl::NotFoundError("no --checkpoint_root: no run history is kept");
  // Like the checkpoint store, nothing beneath the root is followed: a link
  // planted as the run's folder or its history is no history.
  const absl::Status missing = absl::NotFoundError(absl::StrCat("run ", run_id, " has no history"));
  if (!IsRealDirectory(absl::StrCat(root_, "/", run_id))) return missing;
  FileHandle fd(::open(PathOf(run_id).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  struct stat st;
  if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) return missing;
  // The newest kMaxReadBytes only (a partial first line is then skipped).
  const off_t start = st.st_size > kMaxReadBytes ? st.st_size - kMaxReadBytes : 0;
  std::string text(static_cast<size_t>(st.st_size - start), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t n = ::pread(fd.get(), text.data() + got, text.size() - got, start + static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  text.resize(got);
  std::deque<nlohmann::json> lines;
  std::map<std::string, size_t> index;  // op id -> position in `lines` + dropped
  size_t dropped = 0;
  size_t pos = 0;
  if (start > 0) {  // the window began inside a line
    pos = text.find('\n');
    pos = pos == std::string::npos ? text.size() : pos + 1;
  }
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    nlohmann::json j = nlohmann::json::parse(text.begin() + pos, text.begin() + end, nullptr, /*allow_exceptions=*/false);
    pos = end + 1;
    if (j.is_discarded() || !j.is_object()) continue;
    // A line whose fields have other JSON types than this file writes is not one of its lines.
    auto typed = [&j](const char* key, bool (nlohmann::json::*is)() const noexcept) {
      auto it = j.find(key);
      return it == j.end() || ((*it).*is)();
    };
    if (!typed("op_id", &nlohmann::json::is_string) || !typed("type", &nlohmann::json::is_string) ||
        !typed("metrics", &nlohmann::json::is_object)) {
      continue;
    }
    const std::string op_id = j.value("op_id", "");
    if (auto it = index.find(op_id); !op_id.empty() && it != index.end() && it->second >= dropped) {
      lines[it->second - dropped] = std::move(j);
      continue;
    }
    index[op_id] = dropped + lines.size();
    lines.push_back(std::move(j));
    if (lines.size() > max_lines) lines.pop_front(), ++dropped;
  }
  return std::vector<nlohmann::json>(std::make_move_iterator(lines.begin()), std::make_move_iterator(lines.end()));
}

}  // namespace lathe::coordinator
