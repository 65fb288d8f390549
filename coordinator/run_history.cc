// JSONL appends with O_APPEND and one write per line.
#include "coordinator/run_history.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"

namespace lathe::coordinator {

std::string RunHistory::PathOf(const std::string& run_id) const {
  return absl::StrCat(root_, "/", run_id, "/history.jsonl");
}

absl::Status RunHistory::Append(const std::string& run_id, const nlohmann::json& line) const {
  if (root_.empty()) return absl::OkStatus();
  const std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  absl::MutexLock lock(&mu_);
  std::error_code ec;
  std::filesystem::create_directories(absl::StrCat(root_, "/", run_id), ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot make the run folder of ", run_id, ": ", ec.message()));
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
  std::ifstream in(PathOf(run_id));
  if (!in) return absl::NotFoundError(absl::StrCat("run ", run_id, " has no history"));
  std::deque<nlohmann::json> lines;
  std::map<std::string, size_t> index;  // op id -> position in `lines` + dropped
  size_t dropped = 0;
  std::string text;
  while (std::getline(in, text)) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) continue;
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
