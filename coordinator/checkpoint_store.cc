// Listing checkpoint folders by their manifests.
#include "coordinator/checkpoint_store.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "nlohmann/json.hpp"
#include "runtime/checkpoint_path.h"

namespace lathe::coordinator {
namespace {

namespace fs = std::filesystem;

void AddRun(const fs::path& run_dir, std::vector<lathe::v1::Checkpoint>* out) {
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(run_dir / "weights", ec)) {
    const std::string name = entry.path().filename().string();
    if (!runtime::ValidateCheckpointName(name).ok()) continue;
    std::ifstream in(entry.path() / "manifest.json");
    if (!in) continue;
    const nlohmann::json m = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (m.is_discarded() || !m.is_object()) continue;
    lathe::v1::Checkpoint c;
    c.set_id(runtime::CheckpointUri({run_dir.filename().string(), name}));
    c.set_type("training");
    c.set_created_unix_ms(m.value("created_unix_ms", int64_t{0}));
    int64_t bytes = 0;
    for (const fs::directory_entry& f : fs::recursive_directory_iterator(entry.path(), ec)) {
      if (f.is_regular_file(ec)) bytes += static_cast<int64_t>(f.file_size(ec));
    }
    c.set_size_bytes(bytes);
    out->push_back(std::move(c));
  }
}

}  // namespace

absl::StatusOr<std::vector<lathe::v1::Checkpoint>> ListCheckpoints(const std::string& root,
                                                                   const std::string& run_id) {
  if (root.empty()) return absl::FailedPreconditionError("the coordinator has no --checkpoint_root");
  std::vector<lathe::v1::Checkpoint> out;
  if (!run_id.empty()) {
    if (absl::Status s = runtime::ValidateCheckpointName(run_id, "run_id"); !s.ok()) return s;
    AddRun(fs::path(root) / run_id, &out);
  } else {
    std::error_code ec;
    for (const fs::directory_entry& run : fs::directory_iterator(root, ec)) AddRun(run.path(), &out);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.created_unix_ms() != b.created_unix_ms() ? a.created_unix_ms() > b.created_unix_ms() : a.id() < b.id();
  });
  return out;
}

}  // namespace lathe::coordinator
