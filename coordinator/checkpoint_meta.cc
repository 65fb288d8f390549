// Checked reads of checkpoint manifests: parse without exceptions, then test
// each field's type before reading it.
#include "coordinator/checkpoint_meta.h"

#include <sys/stat.h>

#include <cerrno>
#include <limits>

#include "absl/strings/str_cat.h"
#include "coordinator/checkpoint_files.h"
#include "nlohmann/json.hpp"
#include "runtime/quote.h"

namespace lathe::coordinator {
namespace {

using nlohmann::json;

constexpr const char* kManifest = "manifest.json";
constexpr const char* kSidecar = "lathe_sampler.json";

// The non-negative integer at `key` of `object`; nullopt when absent or null.
absl::StatusOr<std::optional<int64_t>> Millis(const json& object, const char* key) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return std::nullopt;
  const bool fits = it->is_number_unsigned()
                        ? it->get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                        : it->is_number_integer() && it->get<int64_t>() >= 0;
  if (!fits) {
    return absl::DataLossError(absl::StrCat(key, " is ", runtime::QuoteForMessage(it->dump(), 64),
                                            ", not a non-negative integer"));
  }
  return it->get<int64_t>();
}

}  // namespace

absl::StatusOr<CheckpointMeta> ParseCheckpointMeta(absl::string_view text, const std::string& kind) {
  const json m = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.is_object()) return absl::DataLossError("not a JSON object");
  if (kind == "weights") {
    auto format = m.find("format");
    if (format == m.end() || !format->is_string() || format->get_ref<const std::string&>() != "lathe-checkpoint-1") {
      return absl::DataLossError("not a lathe checkpoint manifest (format is not \"lathe-checkpoint-1\")");
    }
  }
  CheckpointMeta meta;
  absl::StatusOr<std::optional<int64_t>> created = Millis(m, "created_unix_ms");
  if (!created.ok()) return created.status();
  absl::StatusOr<std::optional<int64_t>> expires = Millis(m, "expires_unix_ms");
  if (!expires.ok()) return expires.status();
  meta.created_unix_ms = *created;
  meta.expires_unix_ms = expires->value_or(0);
  return meta;
}

absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& root, const runtime::CheckpointRef& ref,
                                                  int64_t max_bytes) {
  const bool training = ref.kind == "weights";
  const char* file = training ? kManifest : kSidecar;
  if (!training) {
    // Sampler checkpoints written before the sidecar existed have none.
    struct stat st;
    const std::string path = absl::StrCat(runtime::CheckpointDir(root, ref), "/", file);
    if (::lstat(path.c_str(), &st) != 0 && errno == ENOENT) return CheckpointMeta();
  }
  absl::StatusOr<FileHandle> in = OpenBeneath(root, {ref.run_id, ref.kind, ref.name, file});
  absl::StatusOr<std::string> text = in.ok() ? ReadAll(*in, max_bytes) : absl::StatusOr<std::string>(in.status());
  absl::StatusOr<CheckpointMeta> meta = text.ok() ? ParseCheckpointMeta(*text, ref.kind) : text.status();
  if (meta.ok()) return meta;
  return absl::DataLossError(
      absl::StrCat("checkpoint ", runtime::CheckpointUri(ref), " is corrupt: ", file, ": ", meta.status().message()));
}

}  // namespace lathe::coordinator
