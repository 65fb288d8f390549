// Checkpoint name rules and path parsing.
#include "core/checkpoint_path.h"

#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/quote.h"

namespace lathe::runtime {

namespace {

absl::Status ValidateName(const std::string& name, const std::string& what, bool colon) {
  if (name.empty() || name.size() > 128) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be 1-128 characters (got ", name.size(), ")"));
  }
  if (name[0] == '.') return absl::InvalidArgumentError(absl::StrCat(what, " must not start with '.'"));
  // The suffixes of a save in progress and of a checkpoint being replaced.
  if (absl::EndsWith(name, ".partial") || absl::EndsWith(name, ".replaced")) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must not end in .partial or .replaced"));
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-' || (colon && c == ':');
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " may hold only letters, digits, '.', '_', '-'", colon ? ", ':'" : "", " (found byte ",
                       static_cast<int>(static_cast<unsigned char>(c)), ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateCheckpointName(const std::string& name, const std::string& what) {
  return ValidateName(name, what, /*colon=*/false);
}

absl::Status ValidateRunName(const std::string& run_id, const std::string& what) {
  return ValidateName(run_id, what, /*colon=*/true);
}

absl::StatusOr<CheckpointRef> ParseCheckpointPath(const std::string& path, bool allow_sampler) {
  constexpr absl::string_view kScheme = "lathe://";
  std::vector<std::string> parts;
  if (absl::StartsWith(path, kScheme)) parts = absl::StrSplit(path.substr(kScheme.size()), '/');
  if (parts.size() != 3 || !(parts[1] == "weights" || (allow_sampler && parts[1] == "sampler_weights"))) {
    return absl::InvalidArgumentError(absl::StrCat("path must be lathe://<run_id>/weights/<name>",
                                                   allow_sampler ? " or lathe://<run_id>/sampler_weights/<name>" : "",
                                                   ", not ", QuoteForMessage(path)));
  }
  CheckpointRef ref{parts[0], parts[2], parts[1]};
  if (absl::Status s = ValidateRunName(ref.run_id, "the path's run_id"); !s.ok()) return s;
  if (absl::Status s = ValidateCheckpointName(ref.name, "the path's name"); !s.ok()) return s;
  return ref;
}

std::string CheckpointUri(const CheckpointRef& ref) {
  return absl::StrCat("lathe://", ref.run_id, "/", ref.kind, "/", ref.name);
}

std::string CheckpointDir(const std::string& root, const CheckpointRef& ref) {
  return absl::StrCat(root, "/", ref.run_id, "/", ref.kind, "/", ref.name);
}

}  // namespace lathe::runtime
