// Checkpoint folders on the shared filesystem.
#include "coordinator/checkpoint_store.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "coordinator/checkpoint_files.h"
#include "coordinator/checkpoint_meta.h"
#include "coordinator/request_limits.h"
#include "core/log.h"
#include "core/quote.h"
#include "core/saturating.h"

namespace lathe::coordinator {
namespace {

namespace fs = std::filesystem;

constexpr const char* kKinds[] = {"weights", "sampler_weights"};

// The file whose presence commits a checkpoint: renamed into place last.
const char* Marker(const std::string& kind) {
  return kind == "weights" ? "manifest.json" : "adapter_config.json";
}

// Names under `dir` that are valid checkpoint names (run ids with `runs`) of
// real directories.
std::vector<std::string> RealSubfolders(const fs::path& dir, bool runs = false) {
  std::vector<std::string> names;
  if (!IsRealDirectory(dir)) return names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::string name = it->path().filename().string();
    const absl::Status valid = runs ? runtime::ValidateRunName(name) : runtime::ValidateCheckpointName(name);
    if (valid.ok() && IsRealDirectory(it->path())) names.push_back(std::move(name));
  }
  return names;
}

// Calls fn(ref, folder) for every committed checkpoint of `run_id` (empty: of
// every run) under `root`, reached without following a link.
void ForEachCommitted(const std::string& root, const std::string& run_id,
                      const std::function<void(const runtime::CheckpointRef&, const std::string&)>& fn) {
  std::vector<std::string> runs;
  if (run_id.empty()) runs = RealSubfolders(root, /*runs=*/true);
  else if (IsRealDirectory(fs::path(root) / run_id)) runs.push_back(run_id);
  for (const std::string& run : runs) {
    for (const std::string kind : kKinds) {
      for (const std::string& name : RealSubfolders(fs::path(root) / run / kind)) {
        const runtime::CheckpointRef ref{run, name, kind};
        const std::string folder = runtime::CheckpointDir(root, ref);
        if (IsRealFile(fs::path(folder) / Marker(kind))) fn(ref, folder);
      }
    }
  }
}

}  // namespace

absl::StatusOr<CheckpointStore::Located> CheckpointStore::Locate(const std::string& checkpoint_id) const {
  if (root_.empty()) return absl::FailedPreconditionError("the coordinator has no --checkpoint_root");
  absl::StatusOr<runtime::CheckpointRef> ref = runtime::ParseCheckpointPath(checkpoint_id, /*allow_sampler=*/true);
  if (!ref.ok()) return ref.status();
  const fs::path run = fs::path(root_) / ref->run_id;
  const std::string folder = runtime::CheckpointDir(root_, *ref);
  if (!IsRealDirectory(run) || !IsRealDirectory(run / ref->kind) || !IsRealDirectory(folder) ||
      !IsRealFile(fs::path(folder) / Marker(ref->kind))) {
    return absl::NotFoundError(absl::StrCat("no checkpoint ", runtime::QuoteForMessage(checkpoint_id)));
  }
  return Located{*std::move(ref), folder};
}

void CheckpointStore::ReportCorrupt(const std::string& id, const absl::Status& status) const {
  absl::MutexLock lock(&mu_);
  if (reported_.insert(id).second) LATHE_LOG(Warning, "skipping a corrupt checkpoint: %s", status.message());
}

absl::StatusOr<std::vector<lathe::v1::Checkpoint>> CheckpointStore::List(const std::string& run_id) const {
  if (root_.empty()) return absl::FailedPreconditionError("the coordinator has no --checkpoint_root");
  if (!run_id.empty()) {
    if (absl::Status s = ValidateRunId(run_id); !s.ok()) return s;
  }
  std::vector<lathe::v1::Checkpoint> out;
  ForEachCommitted(root_, run_id, [&](const runtime::CheckpointRef& ref, const std::string& folder) {
    const std::string id = runtime::CheckpointUri(ref);
    absl::StatusOr<CheckpointMeta> meta = Meta(ref);
    if (!meta.ok()) return ReportCorrupt(id, meta.status());
    lathe::v1::Checkpoint& c = out.emplace_back();
    c.set_id(id);
    c.set_type(ref.kind == "weights" ? "training" : "sampler");
    int64_t bytes = 0, newest = 0;
    for (const auto& f : ListRealFiles(folder)) {
      bytes = runtime::SaturatingAdd(bytes, f.size_bytes());
      newest = std::max(newest, f.last_modified_unix_ms());
    }
    c.set_created_unix_ms(meta->created_unix_ms.value_or(newest));
    c.set_expires_unix_ms(meta->expires_unix_ms);
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
  absl::StatusOr<Located> at = Locate(request.checkpoint_id());
  if (!at.ok()) return at.status();
  if (absl::Status s = Meta(at->ref).status(); !s.ok()) return s;
  const std::vector<lathe::v1::CheckpointFile> files = ListRealFiles(at->folder);
  const int64_t total = static_cast<int64_t>(files.size());
  absl::StatusOr<int64_t> start = ParsePageToken(request.page_token(), total);
  if (!start.ok()) return start.status();
  const int64_t size = request.page_size() <= 0 ? 100 : std::min(request.page_size(), 1000);
  const int64_t end = std::min(total, *start + size);  // both below 2^31: no overflow
  lathe::v1::GetCheckpointFilesResponse page;
  page.set_total_count(static_cast<int32_t>(std::min<int64_t>(total, INT32_MAX)));
  for (int64_t i = *start; i < end; ++i) *page.add_files() = files[i];
  if (end < total) page.set_next_page_token(absl::StrCat(end));
  return page;
}

absl::Status CheckpointStore::Download(const std::string& checkpoint_id, const std::string& relative_file_name,
                                       const std::function<bool(const lathe::v1::FileChunk&)>& sink) const {
  if (absl::Status s = ValidateRelativeFileName(relative_file_name); !s.ok()) return s;
  absl::StatusOr<Located> at = Locate(checkpoint_id);
  if (!at.ok()) return at.status();
  if (absl::Status s = Meta(at->ref).status(); !s.ok()) return s;
  // Opened part by part beneath the root, never through a link: whatever the
  // folder holds, nothing outside the checkpoint is reachable.
  std::vector<std::string> parts = {at->ref.run_id, at->ref.kind, at->ref.name};
  for (absl::string_view part : absl::StrSplit(relative_file_name, '/')) parts.emplace_back(part);
  absl::StatusOr<FileHandle> file = OpenBeneath(root_, parts);
  if (!file.ok()) {
    return absl::NotFoundError(absl::StrCat(checkpoint_id, " has no file ",
                                            runtime::QuoteForMessage(relative_file_name), " (",
                                            file.status().message(), ")"));
  }
  std::string buffer(1 << 20, '\0');
  lathe::v1::FileChunk chunk;
  int64_t offset = 0;
  for (;;) {
    const ssize_t n = ::read(file->get(), buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat("cannot read ", runtime::QuoteForMessage(relative_file_name)));
    if (n == 0) break;
    chunk.set_offset(offset);
    chunk.set_data(buffer.data(), static_cast<size_t>(n));
    offset += n;
    if (!sink(chunk)) break;
  }
  return absl::OkStatus();
}

absl::Status CheckpointStore::Delete(const std::string& checkpoint_id) const {
  absl::StatusOr<Located> at = Locate(checkpoint_id);
  if (!at.ok()) return at.status();
  absl::Status s = RemoveBeneath(root_, {at->ref.run_id, at->ref.kind}, at->ref.name);
  if (!s.ok()) return absl::Status(s.code(), absl::StrCat("cannot delete ", checkpoint_id, ": ", s.message()));
  return absl::OkStatus();
}

absl::StatusOr<CheckpointMeta> CheckpointStore::Meta(const runtime::CheckpointRef& ref) const {
  const std::string id = runtime::CheckpointUri(ref);
  const std::string path = absl::StrCat(runtime::CheckpointDir(root_, ref), "/", CheckpointMetaFile(ref.kind));
  struct stat st;
  const bool seen = ::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
  CachedMeta now;
  if (seen) {
    now.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    now.size = st.st_size;
    now.inode = static_cast<int64_t>(st.st_ino);
    absl::MutexLock lock(&mu_);
    auto it = meta_cache_.find(id);
    if (it != meta_cache_.end() && it->second.mtime_ns == now.mtime_ns && it->second.size == now.size &&
        it->second.inode == now.inode && absl::Now() - it->second.read_at < absl::Minutes(1)) {
      return it->second.meta;
    }
  }
  absl::StatusOr<CheckpointMeta> meta = ReadCheckpointMeta(root_, ref, kMaxManifestBytes);
  if (meta.ok() && seen) {
    now.meta = *meta;
    now.read_at = absl::Now();
    absl::MutexLock lock(&mu_);
    meta_cache_[id] = now;
  }
  return meta;
}

void CheckpointStore::PruneMeta(const std::set<std::string>& live) const {
  absl::MutexLock lock(&mu_);
  for (auto it = meta_cache_.begin(); it != meta_cache_.end();) {
    it = live.count(it->first) ? std::next(it) : meta_cache_.erase(it);
  }
}

int CheckpointStore::Expire(absl::Time now) const {
  if (root_.empty()) return 0;
  // Only manifests are read here (and only those that changed), no file
  // sizes: this runs every few seconds.
  const int64_t now_ms = absl::ToUnixMillis(now);
  std::vector<std::string> due;
  std::set<std::string> live;
  ForEachCommitted(root_, "", [&](const runtime::CheckpointRef& ref, const std::string&) {
    const std::string id = runtime::CheckpointUri(ref);
    live.insert(id);
    absl::StatusOr<CheckpointMeta> meta = Meta(ref);
    if (!meta.ok()) return ReportCorrupt(id, meta.status());
    if (meta->expires_unix_ms > 0 && meta->expires_unix_ms <= now_ms) due.push_back(id);
  });
  PruneMeta(live);
  int removed = 0;
  for (const std::string& id : due) removed += Delete(id).ok();
  return removed;
}

}  // namespace lathe::coordinator
