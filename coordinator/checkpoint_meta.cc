// Checked reads of checkpoint manifests: a streaming parse that keeps only
// the few top-level fields needed, then each field's type tested before it is
// read.
#include "coordinator/checkpoint_meta.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/checkpoint_files.h"
#include "nlohmann/json.hpp"
#include "core/quote.h"

namespace lathe::coordinator {
namespace {

using nlohmann::json;

constexpr const char* kManifest = "manifest.json";
constexpr const char* kSidecar = "lathe_sampler.json";
// Real manifests nest four deep (object, tensors, entry, shape).
constexpr int kMaxDepth = 64;

// A SAX reader that keeps only the top-level members named in `wanted`
// (scalars as they are, a nested value as an empty array or object so its
// type still shows) and builds nothing else: memory stays bounded by the
// nesting depth whatever the manifest's size, and nothing throws. Parsing
// fails on malformed JSON or nesting deeper than kMaxDepth.
class TopLevelMembers final : public nlohmann::json_sax<json> {
 public:
  explicit TopLevelMembers(std::vector<std::string> wanted) : wanted_(std::move(wanted)) {}

  bool null() override { return Value(nullptr); }
  bool boolean(bool v) override { return Value(v); }
  bool number_integer(number_integer_t v) override { return Value(v); }
  bool number_unsigned(number_unsigned_t v) override { return Value(v); }
  bool number_float(number_float_t v, const string_t&) override { return Value(v); }
  bool string(string_t& v) override { return Value(v); }
  bool binary(binary_t&) override { return Value(json::array()); }
  bool start_object(std::size_t) override {
    if (depth_ == 0) top_is_object_ = true;
    return Value(json::object()) && ++depth_ <= kMaxDepth;
  }
  bool key(string_t& k) override {
    if (depth_ == 1) key_ = k;
    return true;
  }
  bool end_object() override { return --depth_ >= 0; }
  bool start_array(std::size_t) override { return Value(json::array()) && ++depth_ <= kMaxDepth; }
  bool end_array() override { return --depth_ >= 0; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

  bool top_is_object() const { return top_is_object_; }
  // The wanted members found, as an object (the last of repeated keys wins).
  const json& members() const { return members_; }

 private:
  // A value at the current position; kept when it is a wanted top-level member.
  bool Value(json v) {
    if (depth_ == 1 && std::find(wanted_.begin(), wanted_.end(), key_) != wanted_.end()) members_[key_] = std::move(v);
    return true;
  }

  const std::vector<std::string> wanted_;
  int depth_ = 0;
  bool top_is_object_ = false;
  std::string key_;
  json members_ = json::object();
};

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
  TopLevelMembers reader({"format", "created_unix_ms", "expires_unix_ms"});
  if (!json::sax_parse(text.begin(), text.end(), &reader) || !reader.top_is_object()) {
    return absl::DataLossError(absl::StrCat("not a JSON object (or nested deeper than ", kMaxDepth, ")"));
  }
  const json& m = reader.members();
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

const char* CheckpointMetaFile(const std::string& kind) { return kind == "weights" ? kManifest : kSidecar; }

absl::StatusOr<CheckpointMeta> ReadCheckpointMeta(const std::string& root, const runtime::CheckpointRef& ref,
                                                  int64_t max_bytes) {
  const bool training = ref.kind == "weights";
  const char* file = CheckpointMetaFile(ref.kind);
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
