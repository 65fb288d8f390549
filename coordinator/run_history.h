// A run's history on disk: one JSON line per finished training operation
// (forward, forward_backward, optim_step) in <checkpoint_root>/<run_id>/
// history.jsonl, appended with one write(2) per line (no user-space buffer),
// so a coordinator killed at any point loses at most the line being written,
// and a restarted coordinator, the operator's page and offline tools
// (scripts/history_to_tensorboard.py) read what was there. Line format:
// docs/operations.md, "Run history". Thread-safe.
#ifndef LATHE_COORDINATOR_RUN_HISTORY_H_
#define LATHE_COORDINATOR_RUN_HISTORY_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"

namespace lathe::coordinator {

class RunHistory {
 public:
  // `root`: the checkpoint root (empty: nothing is written or read).
  explicit RunHistory(std::string root) : root_(std::move(root)) {}
  bool enabled() const { return !root_.empty(); }
  const std::string& root() const { return root_; }
  // The file of `run_id` (REQUIRES: a valid run id).
  std::string PathOf(const std::string& run_id) const;
  // Appends `line` (one JSON object) to the run's file, creating the run's
  // folder (beneath the existing root) and the file as needed; a link in
  // their place is refused. Internal on an I/O error (logged by the
  // caller; the operation's result is not affected).
  absl::Status Append(const std::string& run_id, const nlohmann::json& line) const;
  // The run's lines in file order; a line that does not parse (one torn by a
  // crash) is skipped; a later line with the op id of an earlier one replaces
  // it in its place. At most `max_lines`: those nearest the file's end (a
  // line repeated from beyond that window then counts as new). NotFound when
  // the run has no history (or its folder or file is a link). Reads only
  // the file's last kMaxReadBytes.
  static constexpr int64_t kMaxReadBytes = int64_t{256} << 20;
  absl::StatusOr<std::vector<nlohmann::json>> Read(const std::string& run_id, size_t max_lines = 100000) const;

 private:
  const std::string root_;
  mutable absl::Mutex mu_;  // one append at a time, so lines never interleave
};

}  // namespace lathe::coordinator

#endif  // LATHE_COORDINATOR_RUN_HISTORY_H_
