// Checkpoint folders on the shared filesystem.
#include "coordinator/checkpoint_store.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/checkpoint_path.h"

namespace lathe::coordinator {
namespace {

namespace fs = std::filesystem;

constexpr const char* kKinds[] = {"weights", "sampler_weights"};

// A committed checkpoint folder: a training one with its manifest, a sampler one with its adapter.
bool Committed(const fs::path& folder, const std::string& kind) {
  std::error_code ec;
  return fs::is_regular_file(folder / (kind == "weights" ? "manifest.json" : "adapter_config.json"), ec);
}

// The manifest of a training checkpoint, the sidecar of a sampler one.
nlohmann::json Manifest(const fs::path& folder) {
  std::ifstream in(folder / (fs::exists(folder / "manifest.json") ? "manifest.json" : "lathe_sampler.json"));
  nlohmann::json m = in ? nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false) : nlohmann::json();
  return m.is_object() ? m : nlohmann::json::object();
}

int64_t UnixMillis(fs::file_time_type t) {
  const auto sys = std::chrono::time_point_cast<std::chrono::milliseconds>(
      t - fs::file_time_type::clock::now() + std::chrono::system_clock::now());
  return sys.time_since_epoch().count();
}

std::vector<lathe::v1::CheckpointFile> FilesOf(const fs::path& folder) {
  std::vector<lathe::v1::CheckpointFile> files;
  std::error_code ec;
  for (const fs::directory_entry& f : fs::recursive_directory_iterator(folder, ec)) {
    if (!f.is_regular_file(ec)) continue;
    lathe::v1::CheckpointFile file;
    const std::string rel = fs::relative(f.path(), folder, ec).string();
    file.set_relative_file_name(rel);
    int node = -1;
    if (rel.rfind("node_rank-", 0) == 0) absl::SimpleAtoi(rel.substr(10, rel.find('/') - 10), &node);
    file.set_node_rank(node);
    file.set_size_bytes(static_cast<int64_t>(f.file_size(ec)));
    file.set_last_modified_unix_ms(UnixMillis(f.last_write_time(ec)));
    files.push_back(std::move(file));
  }
  std::sort(files.begin(), files.end(),
            [](const auto& a, const auto& b) { return a.relative_file_name() < b.relative_file_name(); });
  return files;
}

// Calls fn(folder, id, kind, manifest) for every committed checkpoint of
// `run_id` (empty: of every run) under `root`.
void ForEachCommitted(const std::string& root, const std::string& run_id,
                      const std::function<void(const fs::path&, const std::string&, const std::string&,
                                               const nlohmann::json&)>& fn) {
  std::error_code ec;
  std::vector<fs::path> runs;
  if (!run_id.empty()) {
    runs.push_back(fs::path(root) / run_id);
  } else {
    for (const fs::directory_entry& run : fs::directory_iterator(root, ec)) runs.push_back(run.path());
  }
  for (const fs::path& run_dir : runs) {
    for (const std::string kind : kKinds) {
      for (const fs::directory_entry& entry : fs::directory_iterator(run_dir / kind, ec)) {
        const std::string name = entry.path().filename().string();
        if (!runtime::ValidateCheckpointName(name).ok() || !Committed(entry.path(), kind)) continue;
        fn(entry.path(), runtime::CheckpointUri({run_dir.filename().string(), name, kind}), kind,
           Manifest(entry.path()));
      }
    }
  }
}

}  // namespace

absl::StatusOr<std::string> CheckpointStore::Folder(const std::string& checkpoint_id) const {
  if (root_.empty()) return absl::FailedPreconditionError("the coordinator has no --checkpoint_root");
  absl::StatusOr<runtime::CheckpointRef> ref = runtime::ParseCheckpointPath(checkpoint_id, /*allow_sampler=*/true);
  if (!ref.ok()) return ref.status();
  const std::string folder = runtime::CheckpointDir(root_, *ref);
  if (!Committed(folder, ref->kind)) return absl::NotFoundError(absl::StrCat("no checkpoint ", checkpoint_id));
  return folder;
}

absl::StatusOr<std::vector<lathe::v1::Checkpoint>> CheckpointStore::List(const std::string& run_id) const {
  if (root_.empty()) return absl::FailedPreconditionError("the coordinator has no --checkpoint_root");
  if (!run_id.empty()) {
    if (absl::Status s = runtime::ValidateCheckpointName(run_id, "run_id"); !s.ok()) return s;
  }
  std::vector<lathe::v1::Checkpoint> out;
  ForEachCommitted(root_, run_id, [&](const fs::path& folder, const std::string& id, const std::string& kind,
                                      const nlohmann::json& m) {
    lathe::v1::Checkpoint& c = out.emplace_back();
    c.set_id(id);
    c.set_type(kind == "weights" ? "training" : "sampler");
    int64_t bytes = 0, newest = 0;
    for (const auto& f : FilesOf(folder)) {
      bytes += f.size_bytes();
      newest = std::max(newest, f.last_modified_unix_ms());
    }
    c.set_created_unix_ms(m.value("created_unix_ms", newest));
    c.set_expires_unix_ms(m.value("expires_unix_ms", int64_t{0}));
    c.set_size_bytes(bytes);
    c.set_sync_state("committed");
  });
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.created_unix_ms() != b.created_unix_ms() ? a.created_unix_ms() > b.created_unix_ms() : a.id() < b.id();
  });
  return out;
}

absl::StatusOr<lathe::v1::GetCheckpointFilesResponse> CheckpointStore::Files(
    const lathe::v1::GetCheckpointFilesRequest& request) const {
  absl::StatusOr<std::string> folder = Folder(request.checkpoint_id());
  if (!folder.ok()) return folder.status();
  const int size = request.page_size() <= 0 ? 100 : std::min(request.page_size(), 1000);
  int start = 0;
  if (!request.page_token().empty() && (!absl::SimpleAtoi(request.page_token(), &start) || start < 0)) {
    return absl::InvalidArgumentError(absl::StrCat("bad page_token '", request.page_token(), "'"));
  }
  const std::vector<lathe::v1::CheckpointFile> files = FilesOf(*folder);
  lathe::v1::GetCheckpointFilesResponse page;
  page.set_total_count(static_cast<int>(files.size()));
  for (int i = start; i < std::min<int>(start + size, files.size()); ++i) *page.add_files() = files[i];
  if (start + size < static_cast<int>(files.size())) page.set_next_page_token(absl::StrCat(start + size));
  return page;
}

absl::Status CheckpointStore::Download(const std::string& checkpoint_id, const std::string& relative_file_name,
                                       const std::function<bool(const lathe::v1::FileChunk&)>& sink) const {
  absl::StatusOr<std::string> folder = Folder(checkpoint_id);
  if (!folder.ok()) return folder.status();
  // Only names the listing gives: nothing outside the checkpoint is reachable.
  bool listed = false;
  for (const auto& f : FilesOf(*folder)) listed = listed || f.relative_file_name() == relative_file_name;
  if (!listed) return absl::NotFoundError(absl::StrCat(checkpoint_id, " has no file ", relative_file_name));
  std::ifstream in(*folder + "/" + relative_file_name, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", relative_file_name));
  std::string buffer(1 << 20, '\0');
  lathe::v1::FileChunk chunk;
  int64_t offset = 0;
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    chunk.set_offset(offset);
    chunk.set_data(buffer.data(), static_cast<size_t>(n));
    offset += n;
    if (!sink(chunk)) break;
  }
  return absl::OkStatus();
}

absl::Status CheckpointStore::Delete(const std::string& checkpoint_id) const {
  absl::StatusOr<std::string> folder = Folder(checkpoint_id);
  if (!folder.ok()) return folder.status();
  // Renamed first, so a concurrent listing never sees a half-deleted folder.
  std::error_code ec;
  const std::string doomed = *folder + ".replaced";
  fs::rename(*folder, doomed, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot delete ", checkpoint_id, ": ", ec.message()));
  fs::remove_all(doomed, ec);
  return absl::OkStatus();
}

int CheckpointStore::Expire(absl::Time now) const {
  if (root_.empty()) return 0;
  // Only manifests are read here, no file sizes: this runs every few seconds.
  std::vector<std::string> due;
  ForEachCommitted(root_, "", [&](const fs::path&, const std::string& id, const std::string&, const nlohmann::json& m) {
    const int64_t expires = m.value("expires_unix_ms", int64_t{0});
    if (expires > 0 && expires <= absl::ToUnixMillis(now)) due.push_back(id);
  });
  int removed = 0;
  for (const std::string& id : due) removed += Delete(id).ok();
  return removed;
}

}  // namespace lathe::coordinator
